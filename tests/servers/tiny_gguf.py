"""A tiny Llama model in GGUF, for running a real inference engine (llama.cpp) in tests.

Its weights are random (seeded), two layers of width 64: llama.cpp loads it, tokenizes
with it and decodes it on the CPU in well under a millisecond a token. Its vocabulary is
SentencePiece's shape (``<unk>``, ``<s>``, ``</s>``, the 256 byte-fallback tokens) plus one
token for each printable ASCII character; the output projection gives the special and
byte tokens nothing, so the text it writes is printable ASCII and it never stops on its
own (a request ends at ``max_tokens``).

    python -m tests.servers.tiny_gguf PATH
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

WIDTH = 64
LAYERS = 2
HEADS = 4
FFN = 128
CONTEXT = 512


def vocabulary() -> tuple[list[str], list[int]]:
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    for c in range(0x21, 0x7F):
        tokens.append(chr(c))
        types.append(gguf.TokenType.NORMAL)
    tokens.append("\u2581")  # SentencePiece's space
    types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def write_model(path: Path, seed: int = 7) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("infersight-tiny")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(WIDTH)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(WIDTH // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-1.0] * (n_vocab - 259))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # a plain template, so that chat requests need nothing the model does not have
    w.add_chat_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")

    def t(name: str, *shape: int, scale: float = 0.2) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    t("token_embd.weight", n_vocab, WIDTH)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(WIDTH, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(WIDTH, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{name}.weight", WIDTH, WIDTH)
        t(f"blk.{i}.ffn_gate.weight", FFN, WIDTH)
        t(f"blk.{i}.ffn_up.weight", FFN, WIDTH)
        t(f"blk.{i}.ffn_down.weight", WIDTH, FFN)
    w.add_tensor("output_norm.weight", np.ones(WIDTH, np.float32))
    out = (rng.standard_normal((n_vocab, WIDTH)) * 0.5).astype(np.float32)
    out[:259] = 0.0  # neither the special tokens nor the bytes are ever the likeliest
    w.add_tensor("output.weight", out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    write_model(Path(sys.argv[1]))
