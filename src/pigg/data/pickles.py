"""Loading user pickles without letting them run code.

A pickle names the callables it wants rebuilt; the stock unpickler imports and calls whatever it
names, so a crafted `user_12.pkl` can run anything. We allow plain containers and scalars only.
Images are stored as paths (str) or as encoded image bytes, neither of which needs a global.
"""
import io
import pickle

ALLOWED_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
    ("builtins", "complex"), ("collections", "OrderedDict"),
    # pickles of protocol 0-2 name bytes through _codecs.encode
    ("_codecs", "encode"),
}


class UnsafePickleError(pickle.UnpicklingError):
    pass


class AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        # protocol 0-2 pickles written by Python 2 or with fix_imports say __builtin__
        if (module.replace("__builtin__", "builtins"), name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source}: refused to load '{module}.{name}': user pickles may hold only lists, dicts, "
            "strings, numbers, booleans, None and image paths or bytes. If you trust this file, "
            "pass --trust-pickle to load it with the full unpickler."
        )


def load_pickle(path, trust: bool = False):
    data = open(path, "rb").read()
    if trust:
        return pickle.loads(data)
    return AllowListUnpickler(io.BytesIO(data), str(path)).load()
