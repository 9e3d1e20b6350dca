"""One error base (``bonefrac.BonefracError``) and configurations that check themselves.

``SecurityConfig`` refuses what ``bonefrac serve`` refuses, so ``create_app()`` called from
Python cannot serve with settings the CLI would not accept.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from bonefrac import BonefracError, InputError  # noqa: E402
from bonefrac.serving.security import SecurityConfig  # noqa: E402


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"token_file": "no/such/tokens.json"}, "token_file no/such/tokens.json: no such file"),
    ({"rate_per_minute": 0}, "rate_per_minute must be > 0"),
    ({"rate_burst": 0}, "rate_burst must be >= 1"),
    ({"audit_max_bytes": 100}, "audit_max_bytes >= 4096"),
    ({"client_concurrency": 0}, "client_concurrency and public_concurrency must be >= 1"),
    ({"public_concurrency": -1}, "client_concurrency and public_concurrency must be >= 1"),
    ({"audit_keep": -1}, "audit_keep and audit_anchor_every must be >= 0"),
    ({"refusal_interval_s": 0}, "refusal_interval_s must be > 0"),
    ({"cors_origins": ("",)}, "cors_origins must be non-empty strings"),
])
def test_security_config_refuses_what_the_cli_refuses(kwargs, message):
    with pytest.raises(InputError, match=message) as e:
        SecurityConfig(**kwargs)
    assert isinstance(e.value, BonefracError) and isinstance(e.value, ValueError)


def test_security_config_defaults_and_the_cli_defaults_are_accepted(tmp_path):
    (tmp_path / "tokens.json").write_text("{}")
    SecurityConfig()
    SecurityConfig(token_file=tmp_path / "tokens.json", rate_per_minute=600, rate_burst=60,
                   client_concurrency=8, public_concurrency=16, audit_keep=0)
