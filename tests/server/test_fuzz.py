"""Schemathesis against our own OpenAPI schema: no generated request may produce a 5xx.

CI runs a bounded number of cases per operation (RFSERVE_FUZZ_EXAMPLES, default 60);
the recorded run in benchmarks/RESULTS.md used 2,000.
"""
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from server.app import create_app
from server.config import ServerConfig
from server.engine import Engine

EXAMPLES = int(os.environ.get("RFSERVE_FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def fuzz_schema(tiny_sd):
    config = ServerConfig(models=[f"instaflow-2rf={tiny_sd}"], device="cpu", max_batch=4, max_queue=8,
                          max_images_per_request=2, max_steps=4, warmup=False, request_timeout_s=30)
    engine = Engine(config)
    engine.load(progress=False)
    app = create_app(engine)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.shutdown()


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_5xx(case):
    case.call_and_validate(checks=[not_a_server_error])
