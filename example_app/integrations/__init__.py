"""One complete program per integration, each included as is by its page in
docs/integrations/ and run against a real server by
tests/test_integration_examples.py.
"""
