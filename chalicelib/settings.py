"""Control-plane settings: one frozen dataclass built from an environment mapping.

Tests hand ``Settings.from_env`` a plain dict; Lambda hands it ``os.environ`` (Chalice sets
the stage's ``environment_variables`` from ``.chalice/config.json``). A bad value fails fast
naming the key.

Example::

    >>> s = Settings.from_env({"STAGE": "prod", "BUCKET": "b", "HEARTBEAT_TIMEOUT_S": "600"})
    >>> (s.stage, s.jobs_table, s.heartbeat_timeout_s, s.active_model_param)
    ('prod', 'nlpfleet-prod-jobs', 600, '/nlpfleet/prod/active-model')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field


class SettingsError(ValueError):
    pass


def _int(env: Mapping[str, str], key: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(key)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{key}={value} must be between {lo} and {hi}")
    return value


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw in (None, ""):
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{key}={raw!r} is not a boolean")


@dataclass(frozen=True)
class Settings:
    stage: str = "dev"
    region: str = "us-east-1"
    bucket: str = ""
    jobs_table: str = "nlpfleet-dev-jobs"
    launch_template: str = "nlpfleet-dev-job"
    instance_profile: str = ""
    inference_asg: str = "nlpfleet-dev-inference"
    active_model_param: str = "/nlpfleet/dev/active-model"
    heartbeat_timeout_s: int = 900
    boot_grace_s: int = 900
    interrupted_grace_s: int = 600
    max_attempts: int = 3
    max_candidates: int = 4
    page_size: int = 25
    max_manifest_bytes: int = 1_000_000
    dry_run: bool = False
    endpoint_url: str | None = None
    dataset_defaults: dict = field(default_factory=lambda: {"type": "finetune"})

    @property
    def debug(self) -> bool:
        return self.stage == "dev"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        stage = env.get("STAGE") or "dev"
        defaults_raw = env.get("DATASET_DEFAULT_SPEC") or '{"type": "finetune"}'
        try:
            dataset_defaults = json.loads(defaults_raw)
        except ValueError:
            raise SettingsError(f"DATASET_DEFAULT_SPEC is not JSON: {defaults_raw!r}") from None
        if not isinstance(dataset_defaults, dict):
            raise SettingsError("DATASET_DEFAULT_SPEC must be a JSON object")
        return cls(
            stage=stage,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            bucket=env.get("BUCKET", ""),
            jobs_table=env.get("JOBS_TABLE") or f"nlpfleet-{stage}-jobs",
            launch_template=env.get("LAUNCH_TEMPLATE") or f"nlpfleet-{stage}-job",
            instance_profile=env.get("INSTANCE_PROFILE", ""),
            inference_asg=env.get("INFERENCE_ASG") or f"nlpfleet-{stage}-inference",
            active_model_param=env.get("ACTIVE_MODEL_PARAM") or f"/nlpfleet/{stage}/active-model",
            heartbeat_timeout_s=_int(env, "HEARTBEAT_TIMEOUT_S", 900, 30, 86_400),
            boot_grace_s=_int(env, "BOOT_GRACE_S", 900, 0, 86_400),
            interrupted_grace_s=_int(env, "INTERRUPTED_GRACE_S", 600, 0, 86_400),
            max_attempts=_int(env, "MAX_ATTEMPTS", 3, 1, 20),
            max_candidates=_int(env, "MAX_CANDIDATES", 4, 1, 20),
            page_size=_int(env, "PAGE_SIZE", 25, 1, 100),
            max_manifest_bytes=_int(env, "MAX_MANIFEST_BYTES", 1_000_000, 1_000, 50_000_000),
            dry_run=_bool(env, "DRY_RUN", False),
            endpoint_url=env.get("NLPFLEET_ENDPOINT_URL") or None,
            dataset_defaults=dataset_defaults,
        )
