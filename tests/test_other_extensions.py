"""An app that uses an extension the guard does not support yet keeps working,
and is told once that nothing is guarded.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy_lite import SQLAlchemy as SQLAlchemyLite

from flask_staleguard import StaleGuard


@pytest.mark.parametrize("order", ["guard-first", "db-first"])
def test_a_flask_sqlalchemy_lite_app_keeps_working(
    mariadb_url: str, guard_log: pytest.LogCaptureFixture, order: str
) -> None:
    app = Flask(__name__)
    app.config["SQLALCHEMY_ENGINES"] = {"default": mariadb_url}
    db = SQLAlchemyLite()
    if order == "guard-first":
        StaleGuard(app)
    db.init_app(app)
    if order == "db-first":
        StaleGuard(app)

    @app.route("/q")
    def query() -> str:
        return str(db.session.execute(sa.text("SELECT 1")).scalar_one())

    try:
        client = app.test_client()
        assert [client.get("/q").text for _ in range(3)] == ["1"] * 3
        assert guard_log.text.count("is not supported yet") == 1
        assert "guards nothing" in guard_log.text
    finally:
        with app.app_context():
            db.engine.dispose()
