"""Tiny random-init transformer configs of every supported family (built from configs: nothing downloaded)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

VOCAB = 96
IMAGE = 32  # pixels per side of the image models' inputs


@dataclass(frozen=True)
class Case:
    """One model of the zoo."""

    name: str
    build: Callable[[], nn.Module]
    auto: str  # the transformers Auto class that reloads it
    causal: bool = False  # a language model: `generate` must run
    derived_heads: bool = False  # head size = hidden_size / num_attention_heads (BERT, GPT-2)
    gqa: bool = False  # fewer key/value heads than query heads
    #: "tokens", "pixels" (pixel_values of IMAGE) or "eos" (tokens ending in one <eos>: BART)
    kind: str = "tokens"
    layers: bool = True  # whole layers are removable
    hidden: bool = True  # the hidden size is prunable (and with a derived head size, the heads)
    seq2seq: bool = False  # an encoder-decoder language model: `generate` must run

    def inputs(self, batch: int = 2, length: int = 10, seed: int = 0) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "pixels":
            return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g)}
        ids = torch.randint(1, VOCAB, (batch, length), generator=g)
        if self.kind == "eos":  # BART's classification head reads the hidden state at the one <eos> per row
            ids = torch.randint(3, VOCAB, (batch, length), generator=g)
            ids[:, -1] = 2
        return {"input_ids": ids}


def _t() -> Any:
    import transformers

    return transformers


def _llama_kwargs(**extra: Any) -> dict[str, Any]:
    base = {
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    base.update(extra)
    return base


def _gpt2_kwargs(**extra: Any) -> dict[str, Any]:
    base = {
        "vocab_size": VOCAB,
        "n_positions": 64,
        "n_embd": 64,
        "n_layer": 4,
        "n_head": 4,
        "pad_token_id": 0,
    }
    base.update(bos_token_id=1, eos_token_id=2)
    base.update(extra)
    return base


def _bert_kwargs(**extra: Any) -> dict[str, Any]:
    base = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "max_position_embeddings": 70,
        "num_labels": 3,
    }
    base.update(extra)
    return base


def _vit_kwargs(**extra: Any) -> dict[str, Any]:
    base = {
        "image_size": IMAGE,
        "patch_size": 8,
        "hidden_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 80,
        "num_labels": 3,
    }
    base.update(extra)
    return base


def _t5_kwargs(**extra: Any) -> dict[str, Any]:
    base = {
        "vocab_size": VOCAB,
        "d_model": 48,
        "d_kv": 12,
        "d_ff": 80,
        "num_layers": 3,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "pad_token_id": 0,
        "eos_token_id": 2,
        "decoder_start_token_id": 0,
    }
    base.update(extra)
    return base


def _bart_kwargs(**extra: Any) -> dict[str, Any]:
    base = {
        "vocab_size": VOCAB,
        "d_model": 48,
        "encoder_layers": 3,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 80,
        "decoder_ffn_dim": 80,
        "max_position_embeddings": 70,
        "num_labels": 3,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "forced_eos_token_id": None,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
    }
    base.update(extra)
    return base


DECODERS = [
    Case(
        "llama",
        lambda: _t().LlamaForCausalLM(_t().LlamaConfig(**_llama_kwargs(tie_word_embeddings=True))),
        "AutoModelForCausalLM",
        causal=True,
        gqa=True,
    ),
    Case(
        "qwen2",
        lambda: _t().Qwen2ForCausalLM(_t().Qwen2Config(**_llama_kwargs())),
        "AutoModelForCausalLM",
        causal=True,
        gqa=True,
    ),
    Case(
        "qwen3",
        lambda: _t().Qwen3ForCausalLM(_t().Qwen3Config(**_llama_kwargs())),
        "AutoModelForCausalLM",
        causal=True,
        gqa=True,
    ),
    Case(
        "mistral",
        lambda: _t().MistralForCausalLM(_t().MistralConfig(**_llama_kwargs())),
        "AutoModelForCausalLM",
        causal=True,
        gqa=True,
    ),
    Case(
        "phi3",
        lambda: _t().Phi3ForCausalLM(
            _t().Phi3Config(**{k: v for k, v in _llama_kwargs().items() if k != "head_dim"})
        ),
        "AutoModelForCausalLM",
        causal=True,
        gqa=True,
    ),
    Case(
        "gpt2",
        lambda: _t().GPT2LMHeadModel(_t().GPT2Config(**_gpt2_kwargs())),
        "AutoModelForCausalLM",
        causal=True,
        derived_heads=True,
    ),
    Case(
        "llama-cls",
        lambda: _t().LlamaForSequenceClassification(_t().LlamaConfig(**_llama_kwargs(num_labels=3))),
        "AutoModelForSequenceClassification",
        gqa=True,
    ),
    Case(
        "qwen2-cls",
        lambda: _t().Qwen2ForSequenceClassification(_t().Qwen2Config(**_llama_kwargs(num_labels=3))),
        "AutoModelForSequenceClassification",
        gqa=True,
    ),
    Case(
        "gpt2-cls",
        lambda: _t().GPT2ForSequenceClassification(_t().GPT2Config(**_gpt2_kwargs(num_labels=3))),
        "AutoModelForSequenceClassification",
        derived_heads=True,
    ),
]

ENCODERS = [
    Case(
        "bert",
        lambda: _t().BertForSequenceClassification(_t().BertConfig(**_bert_kwargs())),
        "AutoModelForSequenceClassification",
        derived_heads=True,
    ),
    Case(
        "roberta",
        lambda: _t().RobertaForSequenceClassification(_t().RobertaConfig(**_bert_kwargs())),
        "AutoModelForSequenceClassification",
        derived_heads=True,
    ),
    Case(
        "electra",
        lambda: _t().ElectraForSequenceClassification(_t().ElectraConfig(**_bert_kwargs(embedding_size=32))),
        "AutoModelForSequenceClassification",
        derived_heads=True,
    ),
    Case(
        "distilbert",
        lambda: _t().DistilBertForSequenceClassification(
            _t().DistilBertConfig(
                vocab_size=VOCAB,
                dim=48,
                hidden_dim=80,
                n_layers=3,
                n_heads=4,
                max_position_embeddings=70,
                num_labels=3,
            )
        ),
        "AutoModelForSequenceClassification",
        derived_heads=True,
    ),
    Case(
        "albert",
        lambda: _t().AlbertForSequenceClassification(
            _t().AlbertConfig(
                **_bert_kwargs(hidden_size=48, embedding_size=24, intermediate_size=80, num_hidden_layers=3)
            )
        ),
        "AutoModelForSequenceClassification",
        derived_heads=True,
        layers=False,
    ),
    Case(
        "vit",
        lambda: _t().ViTForImageClassification(_t().ViTConfig(**_vit_kwargs())),
        "AutoModelForImageClassification",
        kind="pixels",
    ),
    Case(
        "deit",
        lambda: _t().DeiTForImageClassificationWithTeacher(_t().DeiTConfig(**_vit_kwargs())),
        "DeiTForImageClassificationWithTeacher",
        kind="pixels",
    ),
    # T5ForTokenClassification: a T5EncoderModel with a token head (a bare encoder outputs the hidden size).
    Case(
        "t5-encoder",
        lambda: _t().T5ForTokenClassification(_t().T5Config(**_t5_kwargs())),
        "AutoModelForTokenClassification",
    ),
    Case(
        "t5-encoder-gated",
        lambda: _t().T5ForTokenClassification(_t().T5Config(**_t5_kwargs(feed_forward_proj="gated-gelu"))),
        "AutoModelForTokenClassification",
    ),
    Case(
        "bart-cls",
        lambda: _t().BartForSequenceClassification(_t().BartConfig(**_bart_kwargs())),
        "AutoModelForSequenceClassification",
        derived_heads=True,
        kind="eos",
    ),
    # the same encoder-decoder with its tied language-model head (and `final_logits_bias`): `generate` runs
    Case(
        "bart-gen",
        lambda: _t().BartForConditionalGeneration(_t().BartConfig(**_bart_kwargs())),
        "AutoModelForSeq2SeqLM",
        derived_heads=True,
        kind="eos",
        seq2seq=True,
    ),
    Case(
        "mbart-gen",
        lambda: _t().MBartForConditionalGeneration(_t().MBartConfig(**_bart_kwargs())),
        "AutoModelForSeq2SeqLM",
        derived_heads=True,
        kind="eos",
        seq2seq=True,
    ),
]

FAMILY_CASES = DECODERS + ENCODERS
BY_NAME = {c.name: c for c in FAMILY_CASES}


def logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out[0]
