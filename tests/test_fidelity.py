"""The fidelity presets: what 'auto' resolves to, the layer4 settings they give, and AMAN's scores kept per preset."""
import json
from types import SimpleNamespace

import pandas as pd
import pytest

from amanlib import results
from amanlib.fidelity import PRESETS, name_of, resolve_fidelity, train_settings
from amanlib.train import TrainConfig


def test_auto_is_the_authors_on_real_data_and_the_kits_on_synthetic():
    assert resolve_fidelity("auto", pd.DataFrame({"dataset": ["synthetic"] * 3})).name == "kit"
    assert resolve_fidelity("auto", pd.DataFrame({"dataset": ["casme2", "samm"]})).name == "authors"
    assert resolve_fidelity("kit", pd.DataFrame({"dataset": ["casme2"]})).name == "kit"
    with pytest.raises(ValueError, match="fidelity must be one of .*'author'"):
        resolve_fidelity("author", pd.DataFrame({"dataset": ["casme2"]}))


def test_presets_give_valid_train_configs(tmp_path):
    cache = SimpleNamespace(backbone={"checkpoint": "/m/trunk.pt", "name": "fer+"}, path=tmp_path)
    authors = train_settings(PRESETS["authors"], cache)
    assert authors == {"layer4_bn": "per_slice", "layer4_init": "random", "init_layer4_from": None}
    assert train_settings(PRESETS["kit"], cache)["init_layer4_from"] == "/m/trunk.pt"
    TrainConfig(**authors)
    random_trunk = SimpleNamespace(backbone={"checkpoint": None, "name": "random"}, path=tmp_path)
    with pytest.raises(ValueError, match="trunk without one .*fidelity 'authors'"):
        train_settings(PRESETS["kit"], random_trunk)
    with pytest.raises(ValueError, match="layer4_init='backbone', and only then"):
        TrainConfig(init_layer4_from="/m/trunk.pt")  # a checkpoint the random start would silently ignore
    with pytest.raises(ValueError, match="layer4_bn must be one of"):
        TrainConfig(layer4_bn="slice")


def test_names_of_choices():
    assert name_of("frame_batch", "per_slice", "random") == "authors"
    assert name_of("running", "joint", "backbone") == "kit"
    assert name_of("running", "per_slice", "random").startswith("mixed (trunk bn running")


def test_scores_per_preset_keep_only_the_same_clips_and_live_runs(tmp_path):
    (tmp_path / "work/runs/a").mkdir(parents=True)
    entry = lambda name, clips="k1", run="work/runs/a": {"fidelity": name, "clips_key": clips, "seeds": [0, 1],  # noqa: E731
                                                         "epoch_selection": "fixed", "run_dirs": [run]}
    (tmp_path / "metrics.json").write_text(json.dumps({"by_fidelity": {"authors": entry("authors")}}))
    assert set(results._by_fidelity(tmp_path, entry("kit"))) == {"authors", "kit"}
    assert set(results._by_fidelity(tmp_path, entry("kit", clips="k2"))) == {"kit"}  # other clips: not comparable
    (tmp_path / "metrics.json").write_text(json.dumps({"by_fidelity": {"authors": entry("authors", run="gone")}}))
    assert set(results._by_fidelity(tmp_path, entry("kit"))) == {"kit"}  # its runs were deleted
    assert set(results._by_fidelity(tmp_path / "nothing", entry("kit"))) == {"kit"}


def test_random_backbone_with_the_kits_preset_stops_before_any_work():
    from amanlib import params
    with pytest.raises(ValueError, match="fidelity .*backbone 'random' has none; pass fidelity 'authors'"):
        params.validate({"backbone": "random", "fidelity": "kit"}, params.NOTEBOOKS)
    with pytest.raises(ValueError, match="fidelity .*'auto' is the kit's preset here"):
        params.validate({"backbone": "random"}, params.NOTEBOOKS)  # the synthetic default resolves auto to kit
    params.validate({"backbone": "random", "fidelity": "authors"}, params.NOTEBOOKS)
