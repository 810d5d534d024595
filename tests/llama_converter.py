"""Run llama.cpp's own convert_hf_to_gguf.py on a tiny random checkpoint, with a synthetic 300-token
vocabulary in place of the tokenizer a tiny model does not have (set_vocab only: every tensor goes through
the converter's own code). Usage, with llama.cpp's directory and its gguf-py on PYTHONPATH:

    python tests/llama_converter.py HF_DIR --outfile OUT.gguf --outtype f32
"""

import sys
import gguf
import convert_hf_to_gguf as C


def write_vocab(w, n_vocab):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces = [f"\u2581{chr(ord('a') + i % 26)}{i // 26 or ''}" for i in range(n_vocab - len(tokens))]
    tokens += pieces
    types = (
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.NORMAL] * len(pieces)
    )
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(pieces))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


orig = C.get_model_class


def patched(name, mmproj=False):
    cls = orig(name, mmproj=mmproj)
    cls.set_vocab = lambda self: write_vocab(self.gguf_writer, self.hparams["vocab_size"])
    return cls


C.get_model_class = patched
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
C.main()
