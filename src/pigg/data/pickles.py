"""Loading user pickles without letting them run code.

A pickle names the callables it wants rebuilt; the stock unpickler imports and calls whatever it
names, so a crafted `user_12.pkl` can run anything. We allow plain containers and scalars only.
Images are stored as paths (str) or as encoded image bytes, neither of which needs a global.

`why_unreadable` turns whatever the unpickler raised into words a user can act on: files cut short
by an interrupted copy are the common case, so that one says so.
"""
import io
import pickle
from pathlib import Path

ALLOWED_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
    ("builtins", "complex"), ("collections", "OrderedDict"),
    # pickles of protocol 0-2 name bytes through _codecs.encode
    ("_codecs", "encode"),
}
CUT_SHORT = "the file may be cut short; copy it again"


class UnsafePickleError(pickle.UnpicklingError):
    def __init__(self, source: str, module: str, name: str):
        self.reason = (
            f"refused to load '{module}.{name}': user pickles may hold only lists, dicts, strings, numbers, "
            "booleans, None and image paths or bytes. If you trust this file, pass --trust-pickle to load it "
            "with the full unpickler."
        )
        super().__init__(f"{source}: {self.reason}")


class AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        # protocol 0-2 pickles written by Python 2 or with fix_imports say __builtin__
        if (module.replace("__builtin__", "builtins"), name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(self.source, module, name)


def loads(data: bytes, source: str, trust: bool = False):
    if trust:
        return pickle.loads(data)
    return AllowListUnpickler(io.BytesIO(data), source).load()


def load_pickle(path, trust: bool = False):
    return loads(Path(path).read_bytes(), str(path), trust)


def why_unreadable(error: Exception, data: bytes) -> str:
    """What a failed unpickling of `data` means, for a message 'user_12.pkl: cannot be read: ...'."""
    text = str(error)
    if isinstance(error, EOFError) or "truncated" in text:
        return f"pickle data was truncated ({CUT_SHORT})"
    shown = f"{type(error).__name__}: {text}" if text else type(error).__name__
    if isinstance(error, (AttributeError, ImportError)):  # only the full unpickler imports anything
        return f"{shown} (the pickle needs a class or module that this Python cannot find)"
    # Protocol 2+ pickles open with PROTO (0x80); older ones holding a list or dict with MARK, ']' or '}'.
    if data[:1] not in (b"\x80", b"(", b"]", b"}"):
        looks_json = data.lstrip()[:1] in (b"[", b"{")
        return f"not a pickle (it starts with {data[:12]!r})" + ("; JSON lines go in a .jsonl file" if looks_json else "")
    if text.startswith("unsupported pickle protocol"):
        return f"{text} (written by a newer Python? save it again with protocol 4 or 5)"
    if isinstance(error, UnicodeDecodeError) and error.encoding == "ascii":
        # Python 3 reads a Python 2 str as ASCII, so any accented character in it fails here.
        return f"text in the pickle is not ASCII ({text}); a Python 2 pickle? Load it there and save it again from Python 3"
    return f"{shown} (the file looks damaged; copy it again)"
