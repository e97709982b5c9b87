"""A tox plugin of this project's: let tox find every Python pyenv has installed.

pyenv's shims expose only the versions ``PYENV_VERSION`` (or ``pyenv global``)
lists, so ``python3.13`` is "not found" although it is installed. Adding every
installed 3.10-3.13 lets plain ``tox`` run the py310/py311/py313 envs anywhere;
``passenv = PYENV_VERSION`` hands the list to tox's interpreter discovery.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import typing as t

from tox.plugin import impl

if t.TYPE_CHECKING:
    from tox.config.sets import CoreConfigSet
    from tox.session.state import State


def _pyenv(*args: str) -> list[str]:
    return subprocess.run(
        ["pyenv", *args], capture_output=True, text=True, check=False
    ).stdout.split()


@impl
def tox_add_core_config(core_conf: CoreConfigSet, state: State) -> None:
    if shutil.which("pyenv") is None:
        return
    # pyenv's own shim for tox sets PYENV_VERSION to the current version only.
    listed = [v for v in os.environ.get("PYENV_VERSION", "").split(":") if v]
    listed = listed or _pyenv("version-name")
    wanted = re.compile(r"3\.1[0-3]\.\d+")
    extra = [v for v in _pyenv("versions", "--bare") if wanted.fullmatch(v)]
    os.environ["PYENV_VERSION"] = ":".join(dict.fromkeys(listed + extra))
