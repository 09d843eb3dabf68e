import os
from modaldiag.regulators.base import Regulator, encoder_parameters
MODE = os.environ.get("OLD")
if MODE == "reset":
    Regulator.on_fit_start = lambda self, ctx: None
if MODE == "groups":
    def groups(self, model):
        groups = {m: encoder_parameters(model, m) for m in model.modalities}
        enc_ids = {id(p) for ps in groups.values() for p in ps}
        groups["__head__"] = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
        return groups
    Regulator.groups = groups
