"""Loading and saving the Qwen3-VL processor, with or without torchvision.

Stock `Qwen3VLProcessor` needs a video processor, and the video processor needs torchvision.
pigg only feeds images, so without torchvision we build an image-only processor on the PIL image
processor. `AutoProcessor` silently returns a bare tokenizer for such a folder, so we never rely
on it there: `load_processor` builds the right class explicitly.
"""
import importlib.util
from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer, Qwen3VLProcessor

from pigg.offline.tokenizer import CHAT_TEMPLATE

QWEN3_VL_IMAGE_SETTINGS = dict(
    patch_size=16, temporal_patch_size=2, merge_size=2,
    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without a video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def pil_image_processor(**overrides):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**{**QWEN3_VL_IMAGE_SETTINGS, **overrides})


def load_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The processor of a hub id or local folder, with the image resolution bounds applied.

    Resolution goes through `size` (pixels): a per-call `max_pixels` is ignored by transformers 5.17.
    """
    if has_torchvision():
        processor = AutoProcessor.from_pretrained(name_or_path)
        if not hasattr(processor, "image_processor"):
            raise ValueError(f"{name_or_path}: AutoProcessor returned {type(processor).__name__}, not a VL processor")
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
        processor = ImageOnlyQwen3VLProcessor(image_processor, tokenizer, chat_template=processor_chat_template(name_or_path))
    set_resolution(processor, min_pixels, max_pixels)
    if processor.chat_template is None:
        raise ValueError(f"{name_or_path}: the processor has no chat template (chat_template.json or "
                         "chat_template.jinja; the tokenizer's own is not used, as stock AutoProcessor does not)")
    return processor


def processor_chat_template(name_or_path: str):
    """The chat template stock `AutoProcessor` gives the processor of this checkpoint, found the way it finds
    it (chat_template.json, else chat_template.jinja and chat_templates/), never the tokenizer's own: the two
    can differ, and with or without torchvision pigg must render the same prompts."""
    return Qwen3VLProcessor.get_processor_dict(name_or_path)[0].get("chat_template")


def set_resolution(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    size = dict(processor.image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    processor.image_processor.size = size
    for attr, value in (("min_pixels", size["shortest_edge"]), ("max_pixels", size["longest_edge"])):
        if hasattr(processor.image_processor, attr):
            setattr(processor.image_processor, attr, value)


def make_processor(min_pixels: int = 65536, max_pixels: int = 1280 * 28 * 28):
    """A Qwen3-VL processor from the offline tokenizer, for building test and demo checkpoints."""
    from pigg.offline.tokenizer import build_qwen_tokenizer

    image_processor = pil_image_processor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return ImageOnlyQwen3VLProcessor(image_processor, build_qwen_tokenizer(), chat_template=CHAT_TEMPLATE)


def save_processor(processor, path) -> None:
    """Save so that stock `AutoProcessor` loads it as a Qwen3VLProcessor where torchvision exists."""
    import json

    # A call with pad_to_multiple_of (the training collator's) leaves that padding set on the fast
    # tokenizer's backend, and save_pretrained would write it into tokenizer.json for every later user.
    backend = getattr(processor.tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
    processor.save_pretrained(path)
    if getattr(processor, "video_processor", None) is None:
        # Stock Qwen3VLProcessor insists on a video processor config; Qwen3-VL's own settings.
        video = dict(video_processor_type="Qwen3VLVideoProcessor", patch_size=16, temporal_patch_size=2,
                     merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], fps=2,
                     size={"shortest_edge": 4096, "longest_edge": 25165824})
        (Path(path) / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    for name in ("processor_config.json", "tokenizer_config.json"):
        file = Path(path) / name
        if file.is_file():
            data = json.loads(file.read_text())
            if data.get("processor_class") == ImageOnlyQwen3VLProcessor.__name__:
                data["processor_class"] = "Qwen3VLProcessor"
                file.write_text(json.dumps(data, indent=2) + "\n")
