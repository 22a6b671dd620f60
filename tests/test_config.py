from pathlib import Path

import pytest

from vlrl.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert cfg.name
    assert cfg.model.min_pixels <= cfg.model.max_pixels


def test_the_8b_config_is_set_for_qwen3_vl_8b():
    cfg = load_config(ROOT / "configs/qwen3-vl-8b.toml")
    assert cfg.model.path == "Qwen/Qwen3-VL-8B-Instruct"
    assert cfg.model.max_images_per_prompt == 4
    assert cfg.model.max_model_len == 8192
    assert cfg.rollout.group_size >= 8 and cfg.train.gradient_checkpointing


def write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_unknown_key_names_the_key_path_and_the_file(tmp_path):
    p = write(tmp_path, "[rollout]\ngroup_sise = 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "rollout.group_sise" in str(e.value) and str(p) in str(e.value)
    assert "unknown key" in str(e.value)


def test_bad_value_names_the_key_and_the_value(tmp_path):
    p = write(tmp_path, "[rollout]\ntemperature = -1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "rollout.temperature" in str(e.value) and "-1.0" in str(e.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ('[algorithm]\nadvantage = "ppo"\n', "algorithm.advantage"),
        ('[train]\nmicro_batch_size = 0\n', "train.micro_batch_size"),
        ('[model]\ndtype = "int8"\n', "model.dtype"),
        ('[rollout]\ntop_p = 1.5\n', "rollout.top_p"),
        ('[train]\nsteps = "many"\n', "train.steps"),
    ],
)
def test_each_kind_of_bad_value_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="min_pixels"):
        load_config(write(tmp_path, "[model]\nmin_pixels = 100000\nmax_pixels = 1000\n"))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        load_config(write(tmp_path, "[model]\nmax_model_len = 100\n[rollout]\nmax_new_tokens = 100\n"))


def test_invalid_toml_names_the_file(tmp_path):
    p = write(tmp_path, "[rollout\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/config.toml")


def test_overrides_are_typed_and_validated(tmp_path):
    p = write(tmp_path, "[rollout]\ngroup_size = 4\n")
    cfg = load_config(p, ["rollout.group_size=16", "model.path=some/dir", "train.learning_rate=3e-6",
                          "env.system_prompt=Be brief."])
    assert cfg.rollout.group_size == 16
    assert cfg.model.path == "some/dir"
    assert cfg.train.learning_rate == 3e-6
    assert cfg.env.system_prompt == "Be brief."
    with pytest.raises(ConfigError) as e:
        load_config(p, ["rollout.group_size=zero"])
    assert "rollout.group_size" in str(e.value) and "--set rollout.group_size=zero" in str(e.value)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(p, ["rollout.group_size"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/tiny-cpu.toml", ["rollout.group_size=12"])
    out = save_config(cfg, tmp_path / "resolved.toml")
    again = load_config(out)
    assert again == cfg
    assert "group_size = 12" in out.read_text()


def test_every_field_is_documented():
    import typing

    section = Config.__mro__[1]

    def sections(ann):  # the sections inside an annotation: X, list[X], X | None
        if isinstance(ann, type) and issubclass(ann, section):
            return [ann]
        return [s for arg in typing.get_args(ann) for s in sections(arg)]

    seen = []

    def walk(model):
        seen.append(model.__name__)
        for name, field in model.model_fields.items():
            inner = sections(field.annotation)
            if not (isinstance(field.annotation, type) and inner):
                assert field.description, f"{model.__name__}.{name} has no docstring"
            for sub in inner:
                walk(sub)

    walk(Config)
    assert {"RewardSpec", "JudgeConfig"} <= set(seen)


def test_a_group_of_one_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[rollout]\ngroup_size = 1\n"))
    msg = str(e.value)
    assert "rollout.group_size: a sample's advantage is its reward minus its group's mean, always 0" in msg
    assert "set rollout.group_size to 2 or more" in msg and "(got 1)" in msg
    assert load_config(write(tmp_path, "[rollout]\ngroup_size = 2\n")).rollout.group_size == 2


@pytest.mark.parametrize("path", sorted((ROOT / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.mixed_precision == "bf16" and cfg.num_processes >= 1
    assert cfg.distributed_type.name in ("NO", "MULTI_GPU", "FSDP")
    if cfg.distributed_type.name == "FSDP":
        from transformers.models.qwen3_vl import modeling_qwen3_vl

        from vlrl.adapters.qwen3_vl import FSDP_UNITS

        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
        units = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert tuple(units) == FSDP_UNITS and all(hasattr(modeling_qwen3_vl, u) for u in units)
