import pytest

from lightning_hprune import HierarchicalPruning
from tests.helpers import TinyCNN, loaders, trainer


@pytest.mark.parametrize(
    ("kwargs", "expected", "given"),
    [
        ({"target": 0.0}, "`target` to be a float in (0, 1)", "0.0"),
        ({"target": 1.0}, "`target` to be a float in (0, 1)", "1.0"),
        ({"target": 1.5}, "`target` to be a float in (0, 1)", "1.5"),
        ({"target": "half"}, "`target` to be a float in (0, 1)", "'half'"),
        ({"cost": "flops"}, "`cost` to be one of ['latency', 'macs', 'params']", "'flops'"),
        ({"schedule": "exp"}, "`schedule` to be one of", "'exp'"),
        ({"decay": 0}, "`decay` to be a positive number", "0"),
        ({"decay": -0.5}, "`decay` to be a positive number", "-0.5"),
        ({"decay": 1.2}, "`decay` to be a float in (0, 1]", "1.2"),
        ({"start_epoch": -1}, "`start_epoch` to be an integer >= 0", "-1"),
        ({"start_epoch": 3, "end_epoch": 2}, "`end_epoch` to be >= `start_epoch` (3)", "2"),
        ({"every_n_epochs": 0}, "`every_n_epochs` to be an integer >= 1", "0"),
        ({"round_to": -8}, "`round_to` to be an integer >= 1", "-8"),
        ({"round_to": 0}, "`round_to` to be an integer >= 1", "0"),
        ({"round_to": 2.5}, "`round_to` to be an integer >= 1", "2.5"),
        ({"importance": "hessian"}, "`importance` to be one of", "'hessian'"),
        ({"importance": 3}, "`importance` to be an `Importance` object", "3"),
        ({"ignored_layers": [1, 2]}, "`ignored_layers` to be a list of strings", "[1, 2]"),
        ({"monitor": ""}, "`monitor` to be a metric name or None", "''"),
        ({"levels": []}, "`levels` to be a non-empty list of `Level` objects", "[]"),
        ({"levels": ["global"]}, "`levels` to be a non-empty list of `Level` objects", "['global']"),
        ({"tolerance": 2.0}, "`tolerance` to be a float in (0, 1)", "2.0"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, expected, given):
    with pytest.raises(ValueError, match="Expected argument") as err:
        HierarchicalPruning(**kwargs)
    msg = str(err.value)
    assert expected in msg
    assert f"but got {given}" in msg


def test_defaults_are_sensible():
    cb = HierarchicalPruning()
    assert cb.target == 0.5
    assert cb.cost == "macs"
    assert cb.session.round_to == 8
    assert cb.levels


@pytest.mark.fit
def test_unmatched_ignored_pattern_raises_in_setup(tmp_path):
    cb = HierarchicalPruning(ignored_layers=["features.99", "head.*"])
    t = trainer(tmp_path, [cb], max_epochs=2)
    train, val = loaders()
    with pytest.raises(ValueError, match=r"\['features.99'\] matched none"):
        t.fit(TinyCNN(), train, val)
    assert t.global_step == 0  # raised before a training step was wasted


@pytest.mark.fit
def test_end_epoch_beyond_max_epochs_is_a_warning_for_training_in_chunks(tmp_path):
    cb = HierarchicalPruning(end_epoch=5, measure_latency=False, verbose=False, round_to=4)
    t = trainer(tmp_path, [cb], max_epochs=3)
    train, val = loaders()
    with pytest.warns(
        UserWarning, match=r"before the schedule's last event \(end of epoch 5\): 3 of 6 events"
    ):
        t.fit(TinyCNN(), train, val)
    assert t.state.finished
    assert cb.event_index == 3  # the events of epochs 0-2 ran; the rest wait for a resumed fit
