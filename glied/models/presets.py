"""Named decoder ablations (a light module: the CLI builds its ``--model`` choices from it without torch)."""

#: name -> (global_visual, global_attribute, local_distilling)
MODEL_PRESETS: dict[str, tuple[bool, bool, bool]] = {
    "glied": (True, True, True),
    "base": (False, False, False),
    "base+gvd": (True, False, False),  # + global visual distilling
    "base+gad": (False, True, False),  # + global attribute distilling
    "base+gld": (False, False, True),  # + global aspect vector and local cross-modal distilling
}
