"""Run configs: strict YAML loading, dotted overrides, validation before any process group, every shipped file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from distseq.config import ConfigError, RunConfig, dump_yaml, from_dict, load_yaml, parse_overrides
from distseq.config.run import OptimConfig
from distseq.train.trainer import validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_FILES = sorted((CONFIGS / "runs").glob("*.yaml"))


def _world(cfg: RunConfig) -> int:
    """The smallest world a run file is written for: dp (or 1) x sp x tp."""
    p = cfg.parallel
    return (p.dp or 1) * p.sp * p.tp


def test_every_config_file_is_checked():
    every = sorted(CONFIGS.rglob("*.yaml"))
    assert RUN_FILES and every == RUN_FILES, f"only run files (configs/runs/*.yaml) are shipped: {every}"


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_run_files_load_and_validate(path):
    cfg = load_yaml(RunConfig, path)
    assert cfg.name == path.stem, "a run file's name is its file name, so runs/<name> is easy to find"
    plan = validate(cfg, _world(cfg))  # degrees, model x parallel dims, sequence divisibility, data source
    assert plan.dims.world_size == _world(cfg)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "each config file starts with a comment giving the command that runs it"


def test_unknown_keys_are_named_with_their_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  hidden_sise: 64\n")
    with pytest.raises(ConfigError, match=r"model\.hidden_sise") as err:
        load_yaml(RunConfig, f)
    assert "hidden_size" in str(err.value)  # the known keys are listed
    f.write_text("paralel:\n  sp: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config key paralel"):
        load_yaml(RunConfig, f)
    f.write_text("data:\n  synthetic:\n    num_pair: 3\n")
    with pytest.raises(ConfigError, match=r"data\.synthetic\.num_pair"):
        load_yaml(RunConfig, f)


def test_values_are_type_checked(tmp_path):
    f = tmp_path / "c.yaml"
    for text, where in [
        ("model:\n  hidden_size: 64.5\n", "model.hidden_size"),
        ("model:\n  qk_norm: 1\n", "model.qk_norm"),
        ("parallel:\n  softmax_strategy: rung\n", "parallel.softmax_strategy"),
        ("optim:\n  betas: [0.9]\n", "optim.betas"),
        ("data: 3\n", "data"),
        ("- a\n", "top level"),
    ]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=where):
            load_yaml(RunConfig, f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(RunConfig, tmp_path / "missing.yaml")


def test_dataclass_validation_is_reported_with_its_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  num_heads: 4\n  num_kv_heads: 3\n")
    with pytest.raises(ConfigError, match=r"model.*num_heads=4.*num_kv_heads=3"):
        load_yaml(RunConfig, f)
    f.write_text("optim:\n  lr: 1.0e-4\n  min_lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match="min_lr"):
        load_yaml(RunConfig, f)


def test_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  hidden_size: 64\noptim:\n  lr: 1.0e-3\n")
    cfg = load_yaml(
        RunConfig, f, ["optim.lr=3e-4", "parallel.sp=4", "model.layer_pattern=LLLA", "optim.betas=[0.8, 0.9]"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.parallel.sp == 4 and cfg.model.layer_pattern == "LLLA"
    assert cfg.optim.betas == (0.8, 0.9) and cfg.model.hidden_size == 64
    assert load_yaml(RunConfig, f, ["optim.max_grad_norm=null"]).optim.max_grad_norm is None
    with pytest.raises(ConfigError, match=r"parallel\.spp"):
        load_yaml(RunConfig, f, ["parallel.spp=4"])
    for bad in ["parallel.sp", "=3", "a..b=1"]:
        with pytest.raises(ConfigError, match="dotted.key=value"):
            parse_overrides([bad])
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["optim=3", "optim.lr=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_yaml(RunConfig, RUN_FILES[0], ["optim.lr=5e-4"])
    text = dump_yaml(cfg, tmp_path / "resolved.yaml")
    again = load_yaml(RunConfig, tmp_path / "resolved.yaml")
    assert again == cfg and "lr: 0.0005" in text


def test_checks_before_any_process_group():
    cfg = load_yaml(RunConfig, RUN_FILES[0])
    with pytest.raises(ValueError, match=r"world_size=3 is not divisible by sp \* tp"):
        validate(cfg, 3)
    with pytest.raises(ValueError, match=r"global_batch=6 must be divisible by dp \* micro_batch"):
        validate(from_dict(RunConfig, {"data": {"global_batch": 6, "micro_batch": 4}}), 1)
    with pytest.raises(ValueError, match=r"seq_len=250 must be divisible by 4"):
        validate(from_dict(RunConfig, {"data": {"seq_len": 250}, "parallel": {"sp": 2}}), 2)
    with pytest.raises(ValueError, match=r"tp=3 must divide"):
        validate(from_dict(RunConfig, {"model": {"num_heads": 4}, "parallel": {"tp": 3}}), 3)
    with pytest.raises(ValueError, match=r"ep must divide"):
        validate(from_dict(RunConfig, {"parallel": {"sp": 2, "ep": 4}}), 2)
    with pytest.raises(ValueError, match=r"ep must divide num_experts: num_experts=4, ep=8"):
        validate(from_dict(RunConfig, {"model": {"mlp_pattern": "DDDM"}, "parallel": {"sp": 8, "ep": 8}}), 8)
    with pytest.raises(ValueError, match=r"dp \* sp \* tp must equal the world size"):
        validate(from_dict(RunConfig, {"parallel": {"dp": 2, "sp": 2}}), 8)
    with pytest.raises(ValueError, match=r"splits heads over 8 ranks: num_heads/tp = 4"):
        validate(from_dict(RunConfig, {"parallel": {"sp": 8, "softmax_strategy": "ulysses"}}), 8)
    with pytest.raises(ValueError, match="needs data.path"):
        from_dict(RunConfig, {"data": {"source": "tokens"}})
    with pytest.raises(ValueError, match=r"expert parallelism \(ep=2\) needs parallel.data_parallel 'reduce'"):
        validate(from_dict(RunConfig, {"parallel": {"sp": 2, "ep": 2, "data_parallel": "ddp"}}), 2)


def test_deepspeed_section(tmp_path):
    cfg = from_dict(
        RunConfig, {"parallel": {"data_parallel": "deepspeed"}, "deepspeed": {"zero_stage": 3, "offload_param": "cpu"}}
    )
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.offload_param == "cpu"
    f = tmp_path / "c.yaml"
    f.write_text("deepspeed:\n  zero_stag: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key deepspeed\.zero_stag") as err:
        load_yaml(RunConfig, f)
    assert "zero_stage" in str(err.value)  # the known keys are listed
    for section, match in [
        ({"zero_stage": 1, "offload_param": "cpu"}, r"deepspeed.*offload_param='cpu' needs zero_stage 3.*zero_stage=1"),
        ({"zero_stage": 4}, r"deepspeed.*zero_stage must be 0, 1, 2 or 3, got 4"),
        ({"zero_stage": 0, "offload_optimizer": "cpu"}, r"offload_optimizer='cpu' needs zero_stage 1, 2 or 3, got 0"),
        ({"offload_optimizer": "nvme"}, r"deepspeed\.offload_optimizer: 'nvme' is not one of \['none', 'cpu'\]"),
        ({"reduce_bucket_size": 0}, r"reduce_bucket_size must be >= 1 .* got 0"),
    ]:
        with pytest.raises(ConfigError, match=match):
            from_dict(RunConfig, {"deepspeed": section})


def test_deepspeed_checks_before_any_process_group(monkeypatch):
    def deepspeed_run(**parallel):
        return from_dict(RunConfig, {"parallel": {"sp": 2, "data_parallel": "deepspeed", **parallel}})

    with pytest.raises(ValueError, match=r"expert parallelism \(ep=2\) needs parallel.data_parallel 'reduce'"):
        validate(deepspeed_run(ep=2), 2)
    with pytest.raises(ValueError, match=r"parallel.data_parallel 'deepspeed' needs tp=1, got tp=2"):
        validate(deepspeed_run(tp=2), 4)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs DeepSpeed, which is not installed: pip install distseq\[deepspeed\]"):
        validate(deepspeed_run(), 2)
    with pytest.warns(UserWarning, match=r"the deepspeed section has no effect with parallel.data_parallel 'reduce'"):
        validate(from_dict(RunConfig, {"deepspeed": {"zero_stage": 3}}), 1)


def test_warmup_cosine_schedule():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    lrs = [o.lr_at(s, 14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert (
        lrs[4] == pytest.approx(1.0) and lrs[-1] > 0.1 and all(a >= b for a, b in zip(lrs[3:-1], lrs[4:], strict=True))
    )
    assert o.lr_at(14, 14) == pytest.approx(0.1) and o.lr_at(9, 14) == pytest.approx(0.55)
