"""What did not fit when a weights file was read into one of our modules, in one line.

The importers (diffusers' VAE, pytorch-fid's Inception, Hugging Face CLIP) all map a file's
tensors onto our parameter tree and must name every tensor that is missing, misshapen, unused or
otherwise wrong, instead of running a model with half its weights.
"""


def mismatch_report(groups: dict[str, list[str]], shown: int = 5) -> str:
    """ "missing: a, b; unexpected: c, ... (7 in all)" for the non-empty groups ("" if none)."""
    problems = []
    for what, items in groups.items():
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > shown else ""
            problems.append(f"{what}: " + ", ".join(items[:shown]) + more)
    return "; ".join(problems)
