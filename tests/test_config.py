"""Config loading: _base_ inheritance, dotted overrides, validation errors, round trip."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import yaml

from fastkd.config import (
    DATA_ROOT_EMPTY,
    RENAMED_KEYS,
    Config,
    ConfigError,
    DaliConfig,
    DataConfig,
    LossConfig,
    OptimConfig,
    ProfileConfig,
    RunConfig,
    SchedConfig,
    SyntheticConfig,
    TrainConfig,
    deep_merge,
    describe,
    dump_yaml,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_base_inheritance_deep_merges_relative_to_file(tmp_path):
    write(
        tmp_path / "bases" / "root.yaml",
        {"data": {"root": "/d", "batch_size": 8, "workers": 3}, "optim": {"lr": 0.5}},
    )
    write(
        tmp_path / "bases" / "mid.yaml",
        {"_base_": "root.yaml", "data": {"batch_size": 16}, "loss": {"tau": 4}},
    )
    child = write(
        tmp_path / "child.yaml",
        {"_base_": ["bases/mid.yaml"], "data": {"workers": 1}, "sched": {"milestones": [5]}},
    )
    cfg = load_config(child)
    assert cfg.data.root == "/d"  # from the grandparent
    assert cfg.data.batch_size == 16  # parent overrides grandparent
    assert cfg.data.workers == 1  # child overrides both, siblings kept
    assert cfg.optim.lr == 0.5 and cfg.loss.tau == 4.0
    assert cfg.sched.milestones == [5]  # lists are replaced, not merged
    assert isinstance(cfg.loss.tau, float)


def test_multiple_bases_merge_in_order(tmp_path):
    write(tmp_path / "a.yaml", {"data": {"root": "/a", "workers": 2}})
    write(tmp_path / "b.yaml", {"data": {"root": "/b"}})
    cfg = load_config(write(tmp_path / "c.yaml", {"_base_": ["a.yaml", "b.yaml"]}))
    assert cfg.data.root == "/b" and cfg.data.workers == 2


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_names_the_file(tmp_path):
    path = write(tmp_path / "a.yaml", {"_base_": "nope.yaml", "data": {"root": "/x"}})
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(path)


def test_overrides_are_yaml_values(tmp_path):
    path = write(tmp_path / "a.yaml", {"data": {"root": "/x"}})
    cfg = load_config(
        path,
        [
            "optim.lr=0.2",
            "data.root=/data/in1k",
            "sched.milestones=[30,60,90]",
            "train.compile=false",
            "data.synthetic.num_classes=7",
            "run.resume=",
            "loss.tau=3",
        ],
    )
    assert cfg.optim.lr == 0.2
    assert cfg.data.root == "/data/in1k"
    assert cfg.sched.milestones == [30, 60, 90]
    assert cfg.train.compile is False
    assert cfg.data.synthetic.num_classes == 7
    assert cfg.run.resume == ""
    assert cfg.loss.tau == 3.0 and isinstance(cfg.loss.tau, float)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("optim.lr=1e-3", "optim.lr", 0.001),  # YAML 1.1 reads a string
        ("optim.weight_decay=5e-5", "optim.weight_decay", 5e-5),
        ("optim.lr=+2E-1", "optim.lr", 0.2),
        ("optim.lr=1.", "optim.lr", 1.0),
        ("optim.lr='3e-2'", "optim.lr", 0.03),  # a quoted string float() parses
        ("train.amp=off", "train.amp", "off"),  # YAML 1.1 reads False
        ("train.amp=false", "train.amp", "off"),  # a boolean in a choice offering off
        ("optim.fused=off", "optim.fused", "off"),
        ("train.compile=off", "train.compile", False),
        ("train.compile=yes", "train.compile", True),
        ("run.deterministic=On", "run.deterministic", True),
        ("data.batch_size=032", "data.batch_size", 32),  # YAML 1.1 reads octal 26
        ("run.dir=2026-12-02", "run.dir", "2026-12-02"),  # YAML 1.1 reads a date
        ("run.dir=no", "run.dir", "no"),  # YAML 1.1 reads False
        ("train.epochs=1_000", "train.epochs", 1000),  # as int() reads it (YAML 1.1 did too)
    ],
)
def test_values_mean_what_a_person_typed(tmp_path, override, key, expected):
    path = write(tmp_path / "a.yaml", {"data": {"root": "/x"}})
    section, name = key.split(".")
    value = getattr(getattr(load_config(path, [override]), section), name)
    assert value == expected and type(value) is type(expected)


def test_values_in_files_are_read_like_overrides(tmp_path):
    """The same rules in a config file, and --print-config's YAML reads back as typed values."""
    path = write(
        tmp_path / "a.yaml",
        "data: {root: /x}\noptim: {lr: 1e-3, weight_decay: 5e-5, fused: off}\n"
        "train: {amp: off, compile: no}\n",
    )
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.fused) == (0.001, 5e-5, "off")
    assert (cfg.train.amp, cfg.train.compile) == ("off", False)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    # Read back by any YAML 1.1 tool as well: floats and words survive yaml.safe_dump.
    dumped = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert dumped["optim"]["lr"] == 0.001 and dumped["train"]["amp"] == "off"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lr=true", "optim.lr: expected float, got True"),  # a bool is not a number
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("train.compile=2", "train.compile: expected bool"),
        ("loss.kind=off", "loss.kind: 'off' is not one of"),
        ("loss.kind=false", "loss.kind: False is not one of"),  # no 'off' among its choices
    ],
)
def test_typed_values_still_refuse_nonsense(tmp_path, override, fragment):
    path = write(tmp_path / "a.yaml", {"data": {"root": "/x"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "1e3",
        "0o17",
        "+.5",
        "1e+3",
        "010",
        "0x1F",
        "off",
        "yes",
        "~",
        "null",
        "true",
        "2026-12-02",
        "1:30",
        ".inf",
        "1_000",
        "-",
        "plain/path",
    ],
)
def test_config_yaml_reads_back_every_string_unchanged(tmp_path, text):
    """config.yaml (and --print-config) quote what YAML 1.1 or 1.2 would read as a non-string."""
    cfg = load_config(write(tmp_path / "a.yaml", {"data": {"root": "/x"}}), [f"run.dir='{text}'"])
    assert cfg.run.dir == text
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["run"]["dir"] == text


def test_override_beats_file_and_base(tmp_path):
    write(tmp_path / "base.yaml", {"data": {"root": "/x", "batch_size": 4}})
    path = write(tmp_path / "a.yaml", {"_base_": "base.yaml", "data": {"batch_size": 8}})
    assert load_config(path, ["data.batch_size=2"]).data.batch_size == 2


@pytest.mark.parametrize(
    "override, unknown, suggestion",
    [
        ("data.batchsize=3", "'data.batchsize'", "'data.batch_size'"),
        ("optim.lr_=0.1", "'optim.lr_'", "'optim.lr'"),
        ("trian.epochs=3", "'trian'", "'train'"),
        (
            "data.synthetic.num_clases=3",
            "'data.synthetic.num_clases'",
            "'data.synthetic.num_classes'",
        ),
    ],
)
def test_unknown_key_names_key_and_closest(tmp_path, override, unknown, suggestion):
    path = write(tmp_path / "a.yaml", {"data": {"root": "/x"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    text = str(info.value)
    assert f"unknown config key {unknown}" in text
    assert f"did you mean {suggestion}?" in text


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path / "a.yaml", {"data": {"root": "/x"}, "loss": {"temperature": 2}})
    with pytest.raises(ConfigError, match=r"loss\.temperature"):
        load_config(path)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ("data.batch_size=abc", "data.batch_size"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("train.compile=maybe", "train.compile"),
        ("data.backend=dalli", "did you mean 'dali'"),
        ("loss.kind=wsdl", "loss.kind"),
        ("train.amp=fp8", "train.amp"),
        ("data.dali.device=tpu", "data.dali.device: 'tpu' is not one of"),
        ("train.profile.enabled=maybe", "train.profile.enabled: expected bool"),
        ("sched.milestones=5", "sched.milestones"),
        ("data.root=", "data.root is empty"),
        # Every range check of every section, each naming its key.
        ("run.dir=", "run.dir is empty"),
        ("run.setup_timeout_min=0", "run.setup_timeout_min must be >= 1"),
        ("data.image_size=4", "data.image_size must be >= 8"),
        ("data.val_resize=16", "data.val_resize (16) must be >= data.image_size (224)"),
        ("data.crop_area=[0.5,0.2]", "data.crop_area must be [min, max]"),
        ("data.crop_area=[0.1]", "data.crop_area must be [min, max]"),
        ("data.crop_area=[0,1]", "data.crop_area must be [min, max]"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("data.val_batch_size=-1", "data.val_batch_size must be >= 0"),
        ("data.workers=-1", "data.workers must be >= 0"),
        ("data.prefetch=0", "data.prefetch must be >= 1"),
        ("data.mean=[1,2]", "data.mean and data.std need 3 values"),
        ("data.std=[1,0,1]", "data.std must be positive"),
        ("data.dali.hw_decoder_load=1.5", "data.dali.hw_decoder_load must be in [0, 1]"),
        ("data.synthetic.num_classes=1", "data.synthetic.num_classes must be >= 2"),
        ("data.synthetic.val_per_class=0", "data.synthetic.train_per_class and val_per_class"),
        ("data.synthetic.image_size=8", "data.synthetic.image_size must be >= 16"),
        ("loss.tau=0", "loss.tau must be > 0"),
        ("loss.tau=-2", "loss.tau must be > 0"),
        ("loss.tau=.inf", "loss.tau must be > 0 and finite"),
        ("loss.loss_weight=-1", "loss.loss_weight and loss.ce_weight must be >= 0"),
        ("loss.ce_weight=-1", "loss.loss_weight and loss.ce_weight must be >= 0"),
        ("loss.label_smoothing=1", "loss.label_smoothing must be in [0, 1)"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.momentum=-0.5", "optim.momentum and optim.weight_decay must be >= 0"),
        ("optim.weight_decay=-1", "optim.momentum and optim.weight_decay must be >= 0"),
        ("optim.nesterov=true optim.momentum=0", "optim.nesterov needs optim.momentum > 0"),
        ("sched.warmup_epochs=-1", "sched.warmup_epochs must be >= 0"),
        ("sched.warmup_start_factor=0", "sched.warmup_start_factor must be in (0, 1]"),
        ("sched.milestones=[-1,5]", "sched.milestones must be >= 0"),
        ("sched.milestones=[60,30]", "sched.milestones must be increasing"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("train.eval_every=0", "train.eval_every must be >= 1"),
        ("train.max_steps_per_epoch=-1", "train.max_steps_per_epoch must be >= 0"),
        ("train.profile.skip=0", "train.profile.skip must be >= 1"),
        ("train.profile.steps=0", "train.profile.steps must be >= 1"),
    ],
)
def test_bad_values_fail_naming_the_key(tmp_path, overrides, fragment):
    path = write(tmp_path / "a.yaml", {"data": {"root": "/x"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides.split())
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: RunConfig(dir=""), "run.dir is empty"),
        (lambda: DataConfig(batch_size=0), "data.batch_size must be >= 1"),
        (lambda: DataConfig(image_size=300), "data.val_resize (256) must be >= data.image_size"),
        (lambda: DaliConfig(hw_decoder_load=-0.1), "data.dali.hw_decoder_load must be in [0, 1]"),
        (lambda: SyntheticConfig(image_size=8), "data.synthetic.image_size must be >= 16"),
        (lambda: LossConfig(tau=0.0), "loss.tau must be > 0"),
        (lambda: OptimConfig(nesterov=True, momentum=0.0), "optim.nesterov needs"),
        (lambda: SchedConfig(milestones=[3, 2]), "sched.milestones must be increasing"),
        (lambda: TrainConfig(epochs=0), "train.epochs must be >= 1"),
        (lambda: ProfileConfig(steps=0), "train.profile.steps must be >= 1"),
        (lambda: dataclasses.replace(LossConfig(), label_smoothing=1.5), "loss.label_smoothing"),
    ],
)
def test_sections_check_their_fields_when_built_in_code(make, fragment):
    with pytest.raises(ConfigError) as info:
        make()
    assert fragment in str(info.value)


def test_defaults_construct_and_a_run_needs_data_root():
    """Config() and DataConfig() stay constructible (empty data.root on purpose); validate(),
    which from_dict calls, asks for data.root."""
    assert Config().data == DataConfig() and DataConfig().root == ""
    with pytest.raises(ConfigError, match="data.root is empty"):
        Config().validate()
    with pytest.raises(ConfigError, match="data.root is empty"):
        from_dict({})
    from_dict({"data": {"root": "/x"}}).validate()


def test_empty_data_root_reads_the_same_everywhere(tmp_path, monkeypatch):
    """One message for the config, the folder scan and the synthetic set (a DataConfig built in
    code never met the config's check)."""
    from fastkd.data.folder import DataError, scan_imagefolder
    from fastkd.data.synthetic import prepare_synthetic

    with pytest.raises(ConfigError) as from_config:
        from_dict({"data": {"root": ""}})
    with pytest.raises(DataError) as from_scan:
        scan_imagefolder("")
    monkeypatch.chdir(tmp_path)  # were the check missing, the set would land in the cwd
    with pytest.raises(DataError) as from_synthetic:
        prepare_synthetic(DataConfig(synthetic=SyntheticConfig(enabled=True)))
    assert str(from_config.value) == str(from_scan.value) == str(from_synthetic.value)
    assert str(from_config.value) == DATA_ROOT_EMPTY and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_override_into_scalar_is_an_error(tmp_path):
    path = write(tmp_path / "a.yaml", {"data": {"root": "/x"}, "optim": {"lr": 0.1}})
    with pytest.raises(ConfigError, match="optim.lr is not a section"):
        load_config(path, ["optim.lr.x=1"])
    # Not in the file: the override builds a mapping, which validation then rejects by name.
    with pytest.raises(ConfigError, match="optim.momentum: expected float"):
        load_config(path, ["optim.momentum.x=1"])


def test_bad_yaml_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "a.yaml", "data: [unclosed"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "b.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_tags_never_execute(tmp_path):
    path = write(tmp_path / "a.yaml", "data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        CONFIGS / "wsld_resnet34_resnet18_in1k.yaml", ["data.root=/data/in1k", "optim.lr=0.3"]
    )
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert to_dict(again)["loss"]["kind"] == "wsld"


def test_every_field_is_documented():
    rows = describe()
    assert len(rows) > 40
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert undocumented == []


def test_published_recipe_is_exact():
    cfg = load_config(CONFIGS / "wsld_resnet34_resnet18_in1k.yaml")
    assert (cfg.teacher.arch, cfg.student.arch) == ("resnet34", "resnet18")
    assert cfg.teacher.weights == "torchvision:IMAGENET1K_V1"
    assert cfg.data.batch_size == 32 and cfg.data.image_size == 224 and cfg.data.val_resize == 256
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert (
        cfg.sched.kind == "step" and cfg.sched.milestones == [30, 60, 90] and cfg.sched.gamma == 0.1
    )
    assert cfg.train.epochs == 100
    assert (cfg.loss.kind, cfg.loss.tau, cfg.loss.loss_weight, cfg.loss.ce_weight) == (
        "wsld",
        2.0,
        2.5,
        1.0,
    )


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    assert isinstance(load_config(CONFIGS / name), Config)


def test_from_dict_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match="data"):
        from_dict({"data": [1, 2]})


# ---------------------------------------------------------------------------------------------
# Keys renamed into sections: read for one release with a warning, never written
# ---------------------------------------------------------------------------------------------

OLD_KEYS_TREE = {
    "data": {"root": "/x", "dali_device": "cpu", "hw_decoder_load": 0.3, "dali_preallocate": False},
    "train": {"profile": True, "profile_skip": 2, "profile_steps": 3},
}
OLD_KEYS_OVERRIDES = [
    "data.dali_device=cpu",
    "data.hw_decoder_load=0.3",
    "data.dali_preallocate=false",
    "train.profile=true",
    "train.profile_skip=2",
    "train.profile_steps=3",
]
NEW_KEYS_OVERRIDES = [
    "data.dali.device=cpu",
    "data.dali.hw_decoder_load=0.3",
    "data.dali.preallocate=false",
    "train.profile.enabled=true",
    "train.profile.skip=2",
    "train.profile.steps=3",
]


def _deprecations(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FutureWarning)]


def _assert_one_warning_per_old_key(messages: list[str], where: str) -> None:
    assert len(messages) == len(RENAMED_KEYS), messages
    for old, new in RENAMED_KEYS.items():
        (message,) = [m for m in messages if m.startswith(f"config key {old} is deprecated")]
        assert f"write {new} instead" in message and where in message


def _load_quietly(path: Path, overrides: list[str] | None = None) -> Config:
    """load_config, failing on any warning (new keys are read without one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_config(path, overrides)


def test_old_keys_in_a_file_map_to_the_new_keys_with_a_warning(tmp_path):
    path = write(tmp_path / "old.yaml", OLD_KEYS_TREE)
    with pytest.warns(FutureWarning) as record:
        cfg = load_config(path)
    _assert_one_warning_per_old_key(_deprecations(record), f"in {path}")
    expected = _load_quietly(
        write(tmp_path / "a.yaml", {"data": {"root": "/x"}}), NEW_KEYS_OVERRIDES
    )
    assert cfg == expected
    assert cfg.data.dali == DaliConfig(device="cpu", hw_decoder_load=0.3, preallocate=False)
    assert cfg.train.profile == ProfileConfig(enabled=True, skip=2, steps=3)


def test_old_keys_as_overrides_map_to_the_new_keys_with_a_warning(tmp_path):
    path = write(tmp_path / "a.yaml", {"data": {"root": "/x"}, "train": {"profile": {"skip": 4}}})
    with pytest.warns(FutureWarning) as record:
        cfg = load_config(path, OLD_KEYS_OVERRIDES)
    messages = _deprecations(record)
    _assert_one_warning_per_old_key(messages, "in override")
    assert any("in override 'train.profile=true'" in m for m in messages)
    assert cfg == _load_quietly(path, NEW_KEYS_OVERRIDES)
    # train.profile=true sets train.profile.enabled only: the file's train.profile.skip stays.
    with pytest.warns(FutureWarning, match="train.profile is deprecated"):
        assert load_config(path, ["train.profile=true"]).train.profile == ProfileConfig(
            enabled=True, skip=4
        )


def test_old_keys_given_to_from_dict_are_mapped_too():
    with pytest.warns(FutureWarning, match="data.dali_device is deprecated"):
        assert from_dict({"data": {"root": "/x", "dali_device": "gpu"}}).data.dali.device == "gpu"


def test_old_key_and_new_key_follow_the_usual_precedence(tmp_path):
    """Each file is mapped before the _base_ merge: a child's new key overrides a base's old
    key, and an override (old or new) overrides the file, as any key would."""
    write(tmp_path / "base.yaml", {"data": {"root": "/x", "dali_device": "cpu"}})
    child = write(
        tmp_path / "child.yaml", {"_base_": "base.yaml", "data": {"dali": {"device": "gpu"}}}
    )
    with pytest.warns(FutureWarning, match="data.dali_device is deprecated in .*base.yaml"):
        assert load_config(child).data.dali.device == "gpu"
    new_file = write(tmp_path / "new.yaml", {"data": {"root": "/x", "dali": {"device": "gpu"}}})
    with pytest.warns(FutureWarning):
        assert load_config(new_file, ["data.dali_device=cpu"]).data.dali.device == "cpu"


@pytest.mark.parametrize(
    "old, tree",
    [
        ("data.dali_device", {"data": {"dali_device": "cpu", "dali": {"device": "gpu"}}}),
        (
            "data.hw_decoder_load",
            {"data": {"hw_decoder_load": 0.3, "dali": {"hw_decoder_load": 1}}},
        ),
        (
            "data.dali_preallocate",
            {"data": {"dali_preallocate": False, "dali": {"preallocate": "on"}}},
        ),
        ("train.profile_steps", {"train": {"profile_steps": 3, "profile": {"steps": 4}}}),
    ],
)
def test_old_and_new_key_with_different_values_in_one_file_is_an_error(tmp_path, old, tree):
    path = write(tmp_path / "a.yaml", deep_merge({"data": {"root": "/x"}}, tree))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{old} (deprecated) and {RENAMED_KEYS[old]} are both given in {path}" in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.profile=true", "train.profile.enabled=false"],
        ["train.profile.skip=3", "train.profile_skip=2"],
        ["data.dali_device=cpu", "data.dali.device=gpu"],
    ],
)
def test_old_and_new_key_with_different_values_as_overrides_is_an_error(tmp_path, overrides):
    path = write(tmp_path / "a.yaml", {"data": {"root": "/x"}})
    old = next(o.split("=")[0] for o in overrides if o.split("=")[0] in RENAMED_KEYS)
    with pytest.raises(ConfigError) as info, pytest.warns(FutureWarning):
        load_config(path, overrides)
    assert f"{old} (deprecated) and {RENAMED_KEYS[old]} are both given" in str(info.value)


def test_old_and_new_key_with_the_same_value_only_warn(tmp_path):
    tree = {"data": {"root": "/x", "dali_preallocate": "no", "dali": {"preallocate": False}}}
    with pytest.warns(FutureWarning, match="data.dali_preallocate is deprecated"):
        assert load_config(write(tmp_path / "a.yaml", tree)).data.dali.preallocate is False
    path = write(tmp_path / "b.yaml", {"data": {"root": "/x"}})
    with pytest.warns(FutureWarning, match="train.profile_steps is deprecated"):
        cfg = load_config(path, ["train.profile_steps=3", "train.profile.steps=3"])
    assert cfg.train.profile.steps == 3


def test_old_keys_are_range_checked_under_their_new_names(tmp_path):
    path = write(tmp_path / "a.yaml", {"data": {"root": "/x"}})
    for override, message in [
        ("data.hw_decoder_load=2", "data.dali.hw_decoder_load must be in [0, 1]"),
        ("train.profile_skip=0", "train.profile.skip must be >= 1"),
        ("train.profile_steps=0", "train.profile.steps must be >= 1"),
        ("data.dali_device=tpu", "data.dali.device: 'tpu' is not one of"),
    ]:
        with pytest.raises(ConfigError) as info, pytest.warns(FutureWarning):
            load_config(path, [override])
        assert message in str(info.value)


def test_written_config_has_the_new_keys_only(tmp_path):
    """config.yaml and --print-config (both dump_yaml(to_dict(cfg))) write the new sections;
    they read back equal, without a warning."""
    with pytest.warns(FutureWarning):
        cfg = load_config(write(tmp_path / "old.yaml", OLD_KEYS_TREE))
    save_config(cfg, tmp_path / "run" / "config.yaml")
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written == yaml.safe_load(dump_yaml(to_dict(cfg)))
    assert written["data"]["dali"] == {
        "device": "cpu",
        "hw_decoder_load": 0.3,
        "preallocate": False,
    }
    assert written["train"]["profile"] == {"enabled": True, "skip": 2, "steps": 3}
    assert {"dali_device", "hw_decoder_load", "dali_preallocate"}.isdisjoint(written["data"])
    assert {"profile_skip", "profile_steps"}.isdisjoint(written["train"])
    assert _load_quietly(tmp_path / "run" / "config.yaml") == cfg


def test_describe_lists_the_new_keys_only():
    keys = {row[0] for row in describe()}
    assert set(RENAMED_KEYS.values()) <= keys
    assert keys.isdisjoint(RENAMED_KEYS)


@pytest.mark.parametrize("kind", ["wsld", "kd"])
def test_distillation_without_teacher_weights_fails_at_load(kind):
    """A kd/wsld run without teacher weights stops when the config is read, not after the data
    scan; a ce run (teachers, baselines) needs none."""
    with pytest.raises(ConfigError, match=f"teacher.weights is empty but loss.kind={kind}"):
        from_dict({"data": {"root": "x"}, "loss": {"kind": kind}, "teacher": {"weights": ""}})
    cfg = from_dict({"data": {"root": "x"}, "loss": {"kind": "ce"}, "teacher": {"weights": ""}})
    assert cfg.teacher.weights == ""
