"""Tiny GGUF files for tests, written with the `gguf` package's writer: a random Llama of the built-in tokenizer's
byte-level vocabulary (two merges added, which transformers' GGUF tokenizer reader needs), its weights in F32 or
quantized to Q8_0, laid out as llama.cpp lays out a Llama (rows of the query and key projections reordered for its
rotary convention, which transformers' GGUF loader undoes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HEADS, KV_HEADS, HIDDEN, LAYERS, FFN, CONTEXT = 4, 2, 64, 2, 128, 256
MERGES = ["1 2", "a b"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def vocabulary() -> list[str]:
    """The built-in tokenizer's tokens in id order, then the two merged tokens."""
    from unison.models import build_tokenizer

    vocab = build_tokenizer().get_vocab()
    return sorted(vocab, key=vocab.get) + [m.replace(" ", "") for m in MERGES]


def tiny_llama(seed: int = 0):
    """The random Llama a tiny GGUF file holds (fp32, tied embeddings, EOS id 1, pad id 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(vocabulary()),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def llama_cpp_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """A query or key projection's rows in llama.cpp's order: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights under their GGUF names (fp32 arrays)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    for i in range(LAYERS):
        for hf, name in LAYER_NAMES.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                w = llama_cpp_rows(w, HEADS if name == "attn_q" else KV_HEADS)
            out[f"blk.{i}.{name}.weight"] = w
    return {k: v.float().numpy() for k, v in out.items()}


def write_tiny_gguf(path: Path, seed: int = 0, quant: str = "F32", arch: str = "llama"):
    """Write a tiny GGUF file (weights in F32, or Q8_0 for the matrices) and return the model it was made from."""
    import gguf

    model = tiny_llama(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    tokens = vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 5 + [gguf.TokenType.NORMAL] * (len(tokens) - 5))
    w.add_token_merges(MERGES)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for name, a in gguf_tensors(model).items():
        if quant == "Q8_0" and a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
