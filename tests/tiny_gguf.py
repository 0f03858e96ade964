"""A tiny random-weight Llama model in GGUF, for tests against a real llama.cpp server.

No model hub is reachable here, and real models are hundreds of MB; a 2-layer,
64-wide Llama with a few hundred tokens is under 1 MB, is written in well under
a second, and decodes at thousands of tokens per second on a laptop CPU. Its
output is word salad, which is all a gateway test needs: real SSE framing,
real timing, a real server noticing (or not) that its client went away.

Usage: `python tests/tiny_gguf.py OUT.gguf`, or `write_tiny_llama(path)`.
"""

from __future__ import annotations

import sys

import gguf
import numpy as np
import numpy.typing as npt

N_LAYERS = 2
N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_CTX = 256
HEAD_DIM = N_EMBD // N_HEAD
SEED = 1234
WEIGHT_SCALE = 0.02

# SentencePiece marks a preceding space with U+2581; llama.cpp's SPM tokenizer
# (tokenizer.ggml.model = "llama") expects the vocabulary in that form.
SPACE = "\u2581"

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 6 byte.
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# ChatML-like, so the server's Jinja chat formatter has something real to render.
# <|im_start|> / <|im_end|> are control tokens: prompts tokenize compactly
# (the context is only 256 tokens) instead of spelling them out byte by byte.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS_TEXT = (
    "the a an and or of to in on at by for with from as is are was were be it this that he she "
    "they we you i my your our not no yes do have has will can one two three first last new old "
    "good big small long time day night year way thing man world life hand part place work home "
    "water room story book word head house friend line end back face door health art war history "
    "change morning reason air queue gateway model token stream server request user fair slot "
    "backend llama quick brown fox jumps over lazy dog hello say go get make know think take see "
    "come want look use find give tell ask feel try call keep let show hear play run move like "
    "live hold bring write sit stand pay meet set learn lead read add grow open walk win love "
    "buy wait serve send build stay"
)
_WORDS = _WORDS_TEXT.split()
_PIECES = ["s", "ed", "ing", "er", "ly", "est", "tion", "ment", "ness", "able", "al", "ful", "less",
           "ous", "ive", "ize", "re", "un", "de", "pre"]
_PUNCT = list(".,!?;:'-()\"")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types, in id order, without duplicates."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [UNKNOWN, CONTROL, CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [CONTROL, CONTROL]
    # Ordinary pieces: whole words with the space marker, bare letters and
    # suffixes so that unknown words still split into something, punctuation.
    # llama.cpp's SPM tokenizer only merges two adjacent pieces when their
    # concatenation is itself a token, so "▁the" is reachable only through
    # "▁t" and "▁th": every prefix of a word is in the vocabulary too.
    pieces: list[str] = []
    for word in _WORDS:
        marked = SPACE + word
        pieces += [marked[:end] for end in range(2, len(marked) + 1)]
    pieces += [SPACE]
    pieces += [SPACE + chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += [str(d) for d in range(10)]
    pieces += _PIECES + _PUNCT
    seen = set(tokens)
    for p in pieces:
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(NORMAL)
    # SPM merges prefer the higher score: longer pieces win, so "▁the" becomes
    # one token rather than "▁" "t" "h" "e". Special and byte tokens score 0
    # (they are never produced by merging).
    scores = [0.0 if t != NORMAL else float(len(tok)) - i * 1e-4
              for i, (tok, t) in enumerate(zip(tokens, types))]
    return tokens, scores, types


def _tensors(types: list[int]) -> dict[str, npt.NDArray[np.float32]]:
    """Llama weights named and shaped as llama.cpp's llama architecture loads them.

    numpy shapes are (rows, cols) = ggml's ne reversed, e.g. token_embd is
    (n_vocab, n_embd) and attn_q / ffn_gate map n_embd -> out as (out, n_embd).
    """
    rng = np.random.default_rng(SEED)
    n_vocab = len(types)

    def w(*shape: int, scale: float = WEIGHT_SCALE) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    embd = w(n_vocab, N_EMBD)
    # Hidden dimension 0 carries a constant 1.0 for every token. The layers add
    # only ~0.02-sized updates, so after the final RMS norm dimension 0 is about
    # sqrt(N_EMBD) = 8 at every position, whatever the input.
    embd[:, 0] = 1.0
    output = w(n_vocab, N_EMBD, scale=1.0)
    output[:, 0] = 0.0
    # ...which lets the output layer push chosen logits down by a fixed amount
    # (about -16, i.e. a probability under 1e-7 vs the rest) at every step:
    # control tokens (no early end-of-sequence, so a 200-token stream really
    # lasts 200 tokens) and byte tokens (no invalid UTF-8 fragments in the
    # word salad). They stay in the vocabulary for tokenizing input.
    for tid, t in enumerate(types):
        if t != NORMAL:
            output[tid, 0] = -2.0
    tensors: dict[str, npt.NDArray[np.float32]] = {
        "token_embd.weight": embd,
        "output_norm.weight": ones.copy(),
        "output.weight": output,
    }
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = ones.copy()
        tensors[p + "attn_q.weight"] = w(N_EMBD, N_EMBD)
        tensors[p + "attn_k.weight"] = w(N_EMBD, N_EMBD)
        tensors[p + "attn_v.weight"] = w(N_EMBD, N_EMBD)
        tensors[p + "attn_output.weight"] = w(N_EMBD, N_EMBD)
        tensors[p + "ffn_norm.weight"] = ones.copy()
        tensors[p + "ffn_gate.weight"] = w(N_FF, N_EMBD)
        tensors[p + "ffn_up.weight"] = w(N_FF, N_EMBD)
        tensors[p + "ffn_down.weight"] = w(N_EMBD, N_FF)
    return tensors


def write_tiny_llama(path: str) -> None:
    """Write the tiny model to `path` (deterministic: same bytes every time)."""
    tokens, scores, types = _vocab()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("ollamamq-fast tiny test llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, data in _tensors(types).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    write_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")
