"""The two transformer examples, shortened (``--fast``): fit with pruning, table, save_pretrained, fresh-process reload.

The numbers of a ``--fast`` run mean nothing (a few batches); what is checked is the whole path a user takes:
the default hierarchy prunes the Hugging Face model inside a real fit, the model's config stays true, and a
fresh Python process that imports only ``transformers`` loads the saved model and reproduces its outputs.
The full runs and their numbers are in ``docs/transformers.md``.
"""

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fit, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_classifier_example_fast(tmp_path):
    """MiniLM on stdlib docstrings: pruned in the fit, smaller, reloaded by plain transformers with equal predictions."""
    result = _script("text_classifier").main(["--fast", "--root", str(tmp_path)])
    params = result["encoder_params"]
    assert params["after"] < params["before"]
    assert result["macs"]["after"] < result["macs"]["before"]
    reload = result["reload"]
    assert reload["library_imported"] is False
    assert reload["predictions_equal"] is True
    assert reload["n"] > 0
    assert (next(tmp_path.rglob("text_classifier.json"))).is_file()


def test_causal_lm_example_fast(tmp_path):
    """Byte-level Llama: pruned in the fit, reloaded by plain transformers, greedy generation with a KV cache equal."""
    result = _script("causal_lm").main(["--fast", "--root", str(tmp_path)])
    assert result["params"]["after"] < result["params"]["before"]
    reload = result["reload"]
    assert reload["library_imported"] is False
    assert reload["generation_equal"] is True
    config = reload["config"]  # what the plain-transformers process read from the saved config.json
    assert config["num_hidden_layers"] <= 3  # the --fast model has 3 layers
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
