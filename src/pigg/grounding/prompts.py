"""The instruction prompt pigg's data use (the seed's), shared by synthetic users, benchmarks and `pigg predict`."""

PROMPT_TEMPLATE = (
    "Given a GUI image, what are the relative (0-1000) pixel point coordinates for the element "
    "corresponding to the following instruction: {command}\n\nThink step-by-step, provide referring "
    "for the element first and then the grounded point coordinates."
)


def make_prompt(command: str) -> str:
    return PROMPT_TEMPLATE.format(command=command)
