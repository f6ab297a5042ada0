"""Export: merge LoRA adapters into the base weights and write one complete model folder.

The folder is what stock transformers, vLLM or the next pigg run expect: safetensors shards (with an
index when sharded) in the chosen dtype, config.json, generation_config.json and the processor.
`pigg_export.json` records what went in (base, adapters in order with their hashes, configs and
provenance) and is written last, so a folder that has it is complete.

The export is built in a hidden sibling folder and renamed into place, so `out` is either absent,
the old folder, or the whole new one: a kill -9 leaves only `.tmp-<name>-<pid>`, which the next
export removes.
"""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

from pigg.config import ModelConfig
from pigg.model.loading import load_model
from pigg.data.processor import load_processor, save_processor
from pigg.provenance import write_provenance

DTYPES = ("bfloat16", "float16", "float32")
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


def export(model: str | None, adapters: list[str], out, dtype: str = "bfloat16",
           max_shard_size: str = "5GB", force: bool = False) -> Path:
    """Merge `adapters` (in order) into `model` and write the result to `out`; return `out`.

    `model` is a hub id or folder (a pigg full fine-tuning output included); None takes the base
    recorded in the first adapter. Nothing is written until every adapter has been checked.
    """
    out = Path(out)
    adapters = [Path(a) for a in adapters]
    base = model or base_of_adapters(adapters)
    check_request(base, adapters, out, dtype, force)
    base_arch = architecture(base)
    for adapter in adapters:
        check_adapter(base, base_arch, adapter)
    remove_stale_tmp(out)

    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        write_export(base, adapters, tmp, dtype, max_shard_size)
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when something failed
    print(f"exported {base} + {len(adapters)} adapter(s) as {dtype} to {out}")
    return out


def base_of_adapters(adapters: list[Path]) -> str:
    if not adapters:
        raise ValueError("export needs a model, an adapter, or both")
    return read_adapter_config(adapters[0])["base_model_name_or_path"]


def read_adapter_config(adapter: Path) -> dict:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter / name).is_file():
            raise FileNotFoundError(f"{adapter}: no {name}: not a LoRA adapter folder")
    return json.loads((adapter / "adapter_config.json").read_text())


def check_request(base: str, adapters: list[Path], out: Path, dtype: str, force: bool) -> None:
    """Problems with the arguments themselves, all at once, before any model is read."""
    problems = []
    if dtype not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and not force:
        problems.append(f"{out} exists: pass force=True (--force) to replace it")
    if out.resolve() in {Path(base).resolve(), *(a.resolve() for a in adapters)}:
        problems.append(f"{out} is one of the inputs: export to another folder")
    if (Path(base) / "adapter_config.json").is_file():
        problems.append(f"{base} is a LoRA adapter, not a model: give it as an adapter")
    if problems:
        raise ValueError("cannot export:\n  " + "\n  ".join(problems))


# ---- compatibility: refuse an adapter made for another model before anything is written ----

def architecture(name_or_path: str) -> tuple[str, dict]:
    """(model_type, {parameter name: shape}) from the config alone, on the meta device (no weights read)."""
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type != "qwen3_vl":
        return config.model_type, {}
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(config)
    return config.model_type, {n: tuple(p.shape) for n, p in model.named_parameters()}


def check_adapter(base: str, base_arch: tuple, adapter: Path) -> None:
    """Refuse an adapter whose weights do not fit the base, or whose recorded base is another architecture."""
    model_type, shapes = base_arch
    if model_type != "qwen3_vl":
        raise ValueError(f"{base} is a {model_type} model; pigg exports Qwen3-VL (qwen3_vl) models")
    misfits = weight_misfits(adapter, shapes)
    if misfits:
        raise ValueError(f"adapter {adapter} does not fit base {base} ({len(misfits)} weight(s)):\n  "
                         + "\n  ".join(misfits[:10]))
    for recorded in recorded_bases(adapter):
        if same_path(recorded, base):
            continue
        try:
            recorded_arch = architecture(recorded)
        except (OSError, ValueError) as err:
            print(f"note: adapter {adapter} was trained on {recorded}, whose config cannot be read here "
                  f"({type(err).__name__}); its weights fit {base}, so it is merged there")
            continue
        if recorded_arch != base_arch:
            raise ValueError(f"adapter {adapter} was trained on {recorded}, another architecture than base "
                             f"{base}: {architecture_difference(recorded_arch, base_arch)}")
        print(f"note: adapter {adapter} was trained on {recorded}; {base} has the same architecture "
              "(parameter names and shapes), so it is merged there")


def weight_misfits(adapter: Path, shapes: dict) -> list[str]:
    """Each adapter weight whose module is missing in the base or whose shape disagrees with it."""
    from safetensors import safe_open

    read_adapter_config(adapter)
    misfits = []
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            lora = LORA_KEY.match(key)
            name = lora["module"] + ".weight" if lora else key.removeprefix("base_model.model.")
            base_shape = shapes.get(name)
            if base_shape is None:
                misfits.append(f"{key}: the base has no {name}")
                continue
            want = base_shape
            if lora:  # lora_A is (r, in_features), lora_B (out_features, r); the base weight (out, in)
                want = (shape[0], base_shape[1]) if lora["side"] == "A" else (base_shape[0], shape[1])
            if shape != want:
                misfits.append(f"{key}: shape {shape}, but the base's {name} is {base_shape}")
    return misfits


def recorded_bases(adapter: Path) -> list[str]:
    """Where the adapter says it came from: adapter_config.json and, for a pigg output, provenance.json."""
    found = [read_adapter_config(adapter).get("base_model_name_or_path")]
    provenance = adapter / "provenance.json"
    if provenance.is_file():
        found.append(json.loads(provenance.read_text()).get("base_model"))
    return list(dict.fromkeys(b for b in found if b))


def same_path(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def architecture_difference(adapters_base: tuple, export_base: tuple) -> str:
    (type_a, shapes_a), (type_b, shapes_b) = adapters_base, export_base
    if type_a != type_b:
        return f"model type {type_a} vs {type_b}"
    differ = [f"{n} {shapes_a.get(n, 'missing')} vs {shapes_b.get(n, 'missing')}"
              for n in sorted(shapes_a.keys() | shapes_b.keys()) if shapes_a.get(n) != shapes_b.get(n)]
    return f"{len(differ)} parameter(s) differ (adapter's base vs export base), e.g. " + "; ".join(differ[:3])


# ---- writing ----

def write_export(base: str, adapters: list[Path], folder: Path, dtype: str, max_shard_size: str) -> None:
    processor_from = processor_source(base, adapters)
    processor = load_processor(processor_from)
    model = merged_model(base, adapters)
    # Qwen3-VL's sub-configs carry their own dtype; serving stacks may read either.
    for config in (model.config, model.config.text_config, model.config.vision_config):
        config.dtype = dtype
    model.to(getattr(torch, dtype)).save_pretrained(folder, max_shard_size=max_shard_size)
    save_processor(processor, folder)
    configs = copy_training_configs(base, adapters, folder)
    # Written last: its presence marks the folder complete.
    write_provenance(folder / "pigg_export.json", base=dict(name_or_path=base, **pigg_records(Path(base))),
                     adapters=[describe_adapter(a, i) for i, a in enumerate(adapters, 1)], dtype=dtype,
                     max_shard_size=max_shard_size, processor_from=processor_from, training_configs=configs)


def merged_model(base: str, adapters: list[Path]):
    """The base in fp32 on the CPU with each adapter merged in turn (fp32 so rounding happens once, at save)."""
    from peft import PeftModel

    model = load_model(ModelConfig(name_or_path=base, dtype="float32"), "cpu")
    for adapter in adapters:
        print(f"merging {adapter}")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.config.use_cache = True  # training outputs save use_cache=False; serving wants the cache
    return model


def processor_source(base: str, adapters: list[Path]) -> str:
    """The last adapter that saved a processor (its resolution settings were trained with), else the base."""
    for adapter in reversed(adapters):
        if (adapter / "tokenizer_config.json").is_file():
            return str(adapter)
    return base


def copy_training_configs(base: str, adapters: list[Path], folder: Path) -> dict:
    """Copy each input's pigg_config.yaml into training_configs/; {"base" or "adapter_<i>": copied file}."""
    sources = [(Path(base), "base")] + [(a, f"adapter_{i}") for i, a in enumerate(adapters, 1)]
    copied = {}
    for source, label in sources:
        config = source / "pigg_config.yaml"
        if config.is_file():
            target = folder / "training_configs" / f"{label}_pigg_config.yaml"
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(config, target)
            copied[label] = str(target.relative_to(folder))
    return copied


def pigg_records(folder: Path) -> dict:
    """The pigg_config.yaml and provenance.json of a pigg output folder, where present."""
    records = {}
    if (folder / "pigg_config.yaml").is_file():
        records["pigg_config"] = yaml.safe_load((folder / "pigg_config.yaml").read_text())
    if (folder / "provenance.json").is_file():
        records["provenance"] = json.loads((folder / "provenance.json").read_text())
    return records


def describe_adapter(adapter: Path, index: int) -> dict:
    return dict(index=index, path=str(adapter.resolve()),
                adapter_model_sha256=sha256(adapter / "adapter_model.safetensors"),
                base_model_name_or_path=read_adapter_config(adapter).get("base_model_name_or_path"),
                **pigg_records(adapter))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- atomic placement ----

def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an old `out` is renamed aside first and deleted last."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f"{tmp.name}-old"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # keep the earlier export rather than neither
        raise
    shutil.rmtree(old)
    print(f"replaced the earlier {out}")


def remove_stale_tmp(out: Path) -> None:
    """Delete `.tmp-<name>-<pid>[-old]` folders left by exports to `out` whose process is gone."""
    pattern = re.compile(rf"^\.tmp-{re.escape(out.name)}-(\d+)(-old)?$")
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.iterdir()):
        found = pattern.match(path.name)
        if found and path.is_dir() and not process_alive(int(found[1])):
            print(f"removing {path}: left by an interrupted export (process {found[1]} is gone)")
            shutil.rmtree(path)


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process runs one export at a time, so its own leftovers are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
