"""Config errors name the key and what is allowed; overrides apply with dotted keys."""

import pytest

from conftest import ROOT
from forgerpc.clients.config import ConfigError, load_config
from forgerpc.orchestrator.config import StackConfig
from forgerpc.services.reward.config import RewardConfig


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("functions:\n  - {kind: exact_match, weight: 1.0}\nitem_timeout_seconds: 3\n")
    cfg = load_config(RewardConfig, path, ["functions.0.weight=2.5", "server.port=1234"])
    assert cfg.functions[0].weight == 2.5 and cfg.item_timeout_seconds == 3 and cfg.server.port == 1234


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(RewardConfig, None, ["item_timeout=3"])
    text = str(err.value)
    assert "unknown key 'item_timeout'" in text and "item_timeout_seconds" in text


def test_nested_unknown_key():
    with pytest.raises(ConfigError, match=r"unknown key 'server.prot'.*port"):
        load_config(RewardConfig, None, ["server.prot=1"])


def test_bad_value_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(RewardConfig, None, ["functions=[{kind: exact}]"])
    assert "functions.0.kind" in str(err.value) and "'exact_match'" in str(err.value)
    with pytest.raises(ConfigError, match="item_timeout_seconds"):
        load_config(RewardConfig, None, ["item_timeout_seconds=-1"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RewardConfig, None, ["nonsense"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(RewardConfig, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RewardConfig, bad)


def test_stack_config_rejects_unknown_service():
    with pytest.raises(ConfigError, match="unknown service 'rewards'"):
        load_config(StackConfig, None, ["services.rewards.replicas=1"])


def test_groups_per_rollout_must_divide_prompts_per_step():
    from forgerpc.orchestrator.config import RunConfig

    assert load_config(RunConfig, ROOT / "configs/grpo_tiny.yaml", ["grpo.groups_per_rollout=4"]).grpo.groups_per_rollout == 4
    with pytest.raises(ConfigError, match="grpo.groups_per_rollout"):
        load_config(RunConfig, ROOT / "configs/grpo_tiny.yaml", ["grpo.groups_per_rollout=3"])


def test_yaml_on_off_mean_the_words_for_tis():
    # YAML 1.1 would read bare on/off as booleans; load_config's YAML 1.2 booleans keep
    # `loss.tis=off` the word "off", and a genuinely wrong value still names the key.
    from forgerpc.services.trainer.config import TrainerConfig

    assert load_config(TrainerConfig, None, ["loss.tis=off"]).loss.tis == "off"
    assert load_config(TrainerConfig, None, ["loss.tis=on"]).loss.tis == "on"
    with pytest.raises(ConfigError, match="loss.tis"):
        load_config(TrainerConfig, None, ["loss.tis=sometimes"])


def test_yaml_12_booleans_from_files_and_overrides(tmp_path):
    # Only true/false are booleans (YAML 1.2): on/off/yes/no stay words for string fields, while
    # boolean fields still accept them (pydantic parses the strings).
    from forgerpc.clients.config import Config

    class Knobs(Config):
        word: str = ""
        answer: str = ""
        flag: bool = False
        other: bool = True

    path = tmp_path / "knobs.yaml"
    path.write_text("word: off\nanswer: no\nflag: on\nother: False\n")
    knobs = load_config(Knobs, path)
    assert (knobs.word, knobs.answer, knobs.flag, knobs.other) == ("off", "no", True, False)
    assert load_config(Knobs, path, ["word=yes", "other=TRUE"]).model_dump() == {
        "word": "yes", "answer": "no", "flag": True, "other": True}


def test_grpo_temperature_reaches_the_trainer():
    # The generator reports log_softmax(logits / T); a trainer at T = 1 would bias the PPO ratio.
    from forgerpc.orchestrator.config import RunConfig

    tiny = ROOT / "configs/grpo_tiny.yaml"
    cfg = load_config(RunConfig, tiny, ["grpo.temperature=0.7"])  # the trainer takes it
    assert cfg.services["trainer"].config["loss"]["temperature"] == 0.7
    assert cfg.services["trainer"].config["loss"]["kind"] == "grpo"  # the rest of loss is kept
    with pytest.raises(ConfigError, match="grpo.temperature"):  # an explicit other value is an error
        load_config(RunConfig, tiny, ["grpo.temperature=0.7", "services.trainer.config.loss.temperature=1.0"])
    cfg = load_config(RunConfig, tiny, ["grpo.temperature=0.7", "services.trainer.config.loss.temperature=0.7"])
    assert cfg.grpo.temperature == 0.7
    # a trainer reached by address has its own config: nothing to compare here
    assert load_config(RunConfig, tiny, ["grpo.temperature=0.7", "services.trainer.address=127.0.0.1:1"])


def test_run_builds_the_configured_model_shape(tmp_path):
    """`model.*` keys reach the tiny model a run builds; a changed shape rebuilds it."""
    import json
    import pathlib

    from forgerpc.orchestrator.config import RunConfig
    from forgerpc.orchestrator.run import prepare_model

    def built(*overrides):
        small = ["model.hidden_size=32", "model.layers=1", "model.heads=2", "model.kv_heads=1"]
        cfg = load_config(RunConfig, ROOT / "configs/grpo_tiny.yaml", [*small, *overrides])
        return json.loads((pathlib.Path(prepare_model(cfg, tmp_path)) / "config.json").read_text())

    shape = built("model.intermediate_size=48")
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]) == (32, 1, 48)
    assert built()["intermediate_size"] == 64, "0 (the default) means 2 x hidden_size"
    built("model.bos=false")
    tokenizer = json.loads((tmp_path / "model" / "tokenizer.json").read_text())
    assert "<s>" not in json.dumps(tokenizer["post_processor"]), "no BOS unless model.bos is set"
    built("model.bos=true")  # a changed setting rebuilds the model with the BOS tokenizer (grpo_tiny's)
    tokenizer = json.loads((tmp_path / "model" / "tokenizer.json").read_text())
    assert tokenizer["post_processor"]["single"][0] == {"SpecialToken": {"id": "<s>", "type_id": 0}}
