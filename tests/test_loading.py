"""load_model: the embedded default, safe-loading defaults and clear errors."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from factedit.errors import ModelLoadError
from factedit.models.loading import load_model


def test_default_is_the_demo_model():
    model, tok = load_model()
    assert model.config.model_type == "gpt2"
    assert model.config._attn_implementation == "eager"
    assert not model.training
    assert tok.pad_token_id is not None


def test_dtype_choice():
    model, _ = load_model(dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def _tiny_pickle_folder(tmp_path):
    model, tok = load_model()
    cfg = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    m = GPT2LMHeadModel(cfg)
    m.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")  # a legacy pickle checkpoint
    tok.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    return tmp_path


def test_pickle_weights_refused_without_opt_in(tmp_path):
    folder = _tiny_pickle_folder(tmp_path)
    with pytest.raises(ModelLoadError, match="allow-pickle"):
        load_model(folder)
    model, _ = load_model(folder, allow_pickle=True)
    assert model.config.n_layer == 1


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="folder"):
        load_model(tmp_path / "f.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty")
