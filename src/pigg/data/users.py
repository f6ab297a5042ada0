"""User id selections: '11-83', '1,3,5-7', or the seed's `--u A B` (range) / `--u A B C` (list)."""


def parse_users(spec) -> list[int]:
    """Parse a selection into a sorted list of unique user ids."""
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return sorted({int(u) for u in spec})
    ids = set()
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise ValueError(f"cannot read user selection {spec!r}: use '11-83' or '1,3,5-7'")
        lo_i, hi_i = int(lo), int(hi) if sep else int(lo)
        if hi_i < lo_i:
            raise ValueError(f"empty range {part!r} in user selection {spec!r}")
        ids.update(range(lo_i, hi_i + 1))
    if not ids:
        raise ValueError(f"user selection {spec!r} selects nobody")
    return sorted(ids)


def seed_users_arg(numbers: list[int]) -> str:
    """The seed scripts' `--u`: two numbers are a range, one or three-plus a list."""
    if len(numbers) == 2:
        return f"{numbers[0]}-{numbers[1]}"
    return ",".join(str(n) for n in numbers)


def format_users(ids: list[int]) -> str:
    """Compact form for logs: [1,2,3,7] -> '1-3,7'."""
    runs, start, prev = [], None, None
    for u in sorted(ids):
        if start is None:
            start = prev = u
        elif u == prev + 1:
            prev = u
        else:
            runs.append((start, prev))
            start = prev = u
    if start is not None:
        runs.append((start, prev))
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
