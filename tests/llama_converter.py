"""Run llama.cpp's own convert_hf_to_gguf.py on a tiny random checkpoint, with a synthetic 300-token
vocabulary in place of the tokenizer a tiny model does not have (set_vocab only: every tensor goes through
the converter's own code). Usage, with llama.cpp's directory and its gguf-py on PYTHONPATH:

    python tests/llama_converter.py HF_DIR --outfile OUT.gguf --outtype f32
"""

import sys

import convert_hf_to_gguf as C

from avgguf.testing.synthetic import add_vocab  # the vocabulary of the suite's own tiny GGUFs


orig = C.get_model_class


def patched(name, mmproj=False):
    cls = orig(name, mmproj=mmproj)
    cls.set_vocab = lambda self: add_vocab(self.gguf_writer, self.hparams["vocab_size"])
    return cls


C.get_model_class = patched
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
C.main()
