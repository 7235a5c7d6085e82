"""A dataset's classes and what they mean: label order, groupings, abnormal set, readings.

A `Taxonomy` travels with the data (the dataset package owns it) and from there with every
model (its `metadata.json`), so prediction, metrics, calibration, the shortcut controls and the
report read a model's classes from the model, never from SIPaKMeD constants. Standard library
only: importable without TensorFlow, TFDS or JAX.

- `class_names`: the classes in label order (the TFDS `label`, the logits, `probabilities`).
- `abnormal`: the class names counted abnormal (the costly false negatives); may be empty when
  the classes have no clinical meaning (ImageNet, a folder of crops without a taxonomy).
- `views`: named groupings of the classes, e.g.
  `{"2class": {"names": ["normal", "abnormal"], "of": {class_name: group_name, ...}}}`;
  every class belongs to exactly one group of each view and every group has a class.
- `readings`: the clinical reading of each class (e.g. its Bethesda category); `{}` when none
  is defined; a class missing from it has no reading.
- `dataset`: the dataset's name (`sipakmed`, `imagenet`, ...).

`SIPAKMED` is SIPaKMeD's taxonomy (the official 3-class grouping of Plissiti et al. 2018 and the
common 2-class view with Metaplastic normal); `for_dataset(name)` finds a dataset's taxonomy,
`for_class_names(names)` the known one with exactly these class names (else a bare one: how
metadata that names classes only gets a taxonomy; a model's taxonomy is read through
`sipak_jax.model_io.read_metadata`), and `as_taxonomy(x)` takes a `Taxonomy` or plain class
names. `NO_READING` is what predictions and the report say for a class without a reading.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

_FIELDS = ("class_names", "abnormal", "views", "readings", "dataset")

# What predictions and the report say for a class whose taxonomy defines no clinical reading.
NO_READING = "no clinical reading defined"


def _fail(field: str, message: str):
    raise ValueError(f"taxonomy.{field}: {message}")


def _names(value, field: str, allow_empty: bool) -> tuple[str, ...]:
    """A tuple of unique non-empty strings, or a ValueError naming `field`."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        _fail(field, f"expected a list of names, got {type(value).__name__}")
    names = tuple(value)
    if not names and not allow_empty:
        _fail(field, "must not be empty")
    for n in names:
        if not isinstance(n, str) or not n:
            _fail(field, f"every name must be a non-empty string, got {n!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        _fail(field, f"duplicate names {dupes}")
    return names


def _view(name, spec, class_names: tuple[str, ...]) -> dict:
    """One validated view, normalised to `{"names": tuple, "of": dict}`."""
    field = f"views[{name!r}]"
    if not isinstance(name, str) or not name:
        _fail("views", f"view names must be non-empty strings, got {name!r}")
    if not isinstance(spec, Mapping) or set(spec) != {"names", "of"}:
        _fail(field, 'expected a dict with exactly the keys "names" and "of"')
    groups = _names(spec["names"], f"{field}.names", allow_empty=False)
    of = spec["of"]
    if not isinstance(of, Mapping):
        _fail(f"{field}.of", "expected a dict {class name: group name}")
    unknown = sorted(set(of) - set(class_names), key=str)
    missing = [c for c in class_names if c not in of]
    if unknown or missing:
        _fail(f"{field}.of", f"must map every class exactly; unknown {unknown}, missing {missing}")
    bad = sorted({g for g in of.values() if g not in groups}, key=str)
    if bad:
        _fail(f"{field}.of", f"groups {bad} are not in {field}.names {list(groups)}")
    empty = [g for g in groups if g not in of.values()]
    if empty:
        _fail(f"{field}.names", f"groups {empty} have no class")
    return {"names": groups, "of": {c: of[c] for c in class_names}}


def _check_2class(views: dict, abnormal: tuple[str, ...]) -> None:
    """A "2class" view with an "abnormal" group must put exactly the abnormal classes in it."""
    spec = views.get("2class")
    if spec is None or not abnormal or "abnormal" not in spec["names"]:
        return
    grouped = sorted(c for c, g in spec["of"].items() if g == "abnormal")
    if grouped != sorted(abnormal):
        _fail(
            "views['2class']",
            f"its abnormal group {grouped} differs from abnormal {sorted(abnormal)}",
        )


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    """Classes in label order and their meaning; validated on construction (ValueError)."""

    class_names: tuple[str, ...]
    abnormal: tuple[str, ...] = ()
    views: dict[str, dict] = dataclasses.field(default_factory=dict)
    readings: dict[str, str] = dataclasses.field(default_factory=dict)
    dataset: str = ""

    def __post_init__(self):
        names = _names(self.class_names, "class_names", allow_empty=False)
        abnormal = _names(self.abnormal, "abnormal", allow_empty=True)
        unknown = [a for a in abnormal if a not in names]
        if unknown:
            _fail("abnormal", f"{unknown} are not in class_names {list(names)}")
        if not isinstance(self.views, Mapping):
            _fail("views", "expected a dict {view name: {names, of}}")
        views = {k: _view(k, v, names) for k, v in self.views.items()}
        if not isinstance(self.readings, Mapping):
            _fail("readings", "expected a dict {class name: reading}")
        for k, v in self.readings.items():
            if k not in names:
                _fail("readings", f"{k!r} is not in class_names {list(names)}")
            if not isinstance(v, str) or not v:
                _fail(f"readings[{k!r}]", "must be a non-empty string")
        if not isinstance(self.dataset, str):
            _fail("dataset", f"expected a string, got {type(self.dataset).__name__}")
        _check_2class(views, abnormal)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "abnormal", tuple(n for n in names if n in abnormal))
        object.__setattr__(self, "views", views)
        object.__setattr__(
            self, "readings", {n: self.readings[n] for n in names if n in self.readings}
        )

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @classmethod
    def bare(cls, class_names: Sequence[str], dataset: str = "") -> Taxonomy:
        """Class names with no clinical meaning: no abnormal set, no views, no readings."""
        return cls(class_names=tuple(class_names), dataset=dataset)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def abnormal_indices(self) -> tuple[int, ...]:
        """Label indices of the abnormal classes, ascending (empty when none are)."""
        return tuple(i for i, n in enumerate(self.class_names) if n in self.abnormal)

    def _spec(self, view: str) -> dict:
        if view not in self.views:
            raise ValueError(
                f"taxonomy of {self.dataset or 'this model'!r} has no view {view!r}; "
                f"its views: {sorted(self.views) or 'none'}"
            )
        return self.views[view]

    def view_names(self, view: str) -> tuple[str, ...]:
        """The group names of `view`, in group-index order."""
        return tuple(self._spec(view)["names"])

    def view_labels(self, view: str) -> tuple[int, ...]:
        """Group index of each class (label index -> group index) in `view`."""
        spec = self._spec(view)
        return tuple(spec["names"].index(spec["of"][n]) for n in self.class_names)

    def reading(self, name: str) -> str | None:
        """The clinical reading of class `name`; None when none is defined."""
        if name not in self.class_names:
            raise ValueError(f"{name!r} is not a class of {self.dataset or 'this taxonomy'!r}")
        return self.readings.get(name)

    def to_dict(self) -> dict:
        """JSON-serialisable form (lists and dicts); `from_dict(to_dict())` gives it back."""
        return {
            "class_names": list(self.class_names),
            "abnormal": list(self.abnormal),
            "views": {
                k: {"names": list(v["names"]), "of": dict(v["of"])} for k, v in self.views.items()
            },
            "readings": dict(self.readings),
            "dataset": self.dataset,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Taxonomy:
        """Reads `to_dict`'s form; `class_names` is required, the rest default to none.

        Raises ValueError naming the field when something is missing, unknown or inconsistent.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"taxonomy: expected a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_FIELDS), key=str)
        if unknown:
            raise ValueError(
                f"taxonomy: unknown fields {unknown}; expected some of {list(_FIELDS)}"
            )
        if "class_names" not in d:
            _fail("class_names", "missing (the classes in label order)")
        return cls(
            class_names=_names(d["class_names"], "class_names", allow_empty=False),
            abnormal=_names(d.get("abnormal", ()), "abnormal", allow_empty=True),
            views=d.get("views", {}),
            readings=d.get("readings", {}),
            dataset=d.get("dataset", ""),
        )


_SIPAKMED_3CLASS = {
    "Superficial-Intermediate": "normal",
    "Parabasal": "normal",
    "Metaplastic": "benign",
    "Koilocytotic": "abnormal",
    "Dyskeratotic": "abnormal",
}

# Alphabetical, as the official archives `im_<Class>.7z` sort; this order is the TFDS label.
SIPAKMED = Taxonomy(
    class_names=(
        "Dyskeratotic",
        "Koilocytotic",
        "Metaplastic",
        "Parabasal",
        "Superficial-Intermediate",
    ),
    abnormal=("Dyskeratotic", "Koilocytotic"),
    views={
        # The dataset's official 3-class grouping (Plissiti et al. 2018).
        "3class": {"names": ("normal", "benign", "abnormal"), "of": _SIPAKMED_3CLASS},
        # The common 2-class view: Metaplastic counts as normal (some public code puts it in
        # "abnormal"; we do not).
        "2class": {
            "names": ("normal", "abnormal"),
            "of": {
                c: "abnormal" if g == "abnormal" else "normal" for c, g in _SIPAKMED_3CLASS.items()
            },
        },
    },
    # What a cytopathologist would write (The Bethesda System); see README "Clinical reading".
    readings={
        "Superficial-Intermediate": "NILM (mature squamous cells)",
        "Parabasal": "NILM (immature squamous cells, atrophy pattern)",
        "Metaplastic": "NILM (squamous metaplasia)",
        "Koilocytotic": "LSIL (HPV cytopathic effect); ASC-US if equivocal",
        "Dyskeratotic": "LSIL spectrum / ASC-US; marked atypia may suggest HSIL",
    },
    dataset="sipakmed",
)

# Herlev (Jantzen et al. 2005): the class folders of smear2005.zip, alphabetical (the TFDS
# label order), spelt as the archive spells them ("superficiel" included).
_HERLEV_CLASSES = (
    "carcinoma_in_situ",
    "light_dysplastic",
    "moderate_dysplastic",
    "normal_columnar",
    "normal_intermediate",
    "normal_superficiel",
    "severe_dysplastic",
)
_HERLEV_NORMAL = ("normal_columnar", "normal_intermediate", "normal_superficiel")

HERLEV = Taxonomy(
    class_names=_HERLEV_CLASSES,
    abnormal=tuple(c for c in _HERLEV_CLASSES if c not in _HERLEV_NORMAL),
    views={
        # The dataset's own 2-class problem (Jantzen et al. 2005): classes 1-3 normal.
        "2class": {
            "names": ("normal", "abnormal"),
            "of": {c: "normal" if c in _HERLEV_NORMAL else "abnormal" for c in _HERLEV_CLASSES},
        },
    },
    # The Bethesda System 2014 (Nayar & Wilbur), its table of terms: LSIL covers mild
    # dysplasia / CIN 1; HSIL covers moderate and severe dysplasia and carcinoma in situ
    # (CIN 2, CIN 3). See tfds_sipakmed/herlev/README.md.
    readings={
        "normal_superficiel": "NILM (superficial squamous cells)",
        "normal_intermediate": "NILM (intermediate squamous cells)",
        "normal_columnar": "NILM (endocervical columnar cells)",
        "light_dysplastic": "LSIL (mild dysplasia, CIN 1)",
        "moderate_dysplastic": "HSIL (moderate dysplasia, CIN 2)",
        "severe_dysplastic": "HSIL (severe dysplasia, CIN 3)",
        "carcinoma_in_situ": "HSIL (carcinoma in situ, CIN 3)",
    },
    dataset="herlev",
)

_CRIC_CLASSES = ("NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC")
_CRIC_3CLASS = {
    "NILM": "normal",
    "ASC-US": "low-grade",
    "LSIL": "low-grade",
    "ASC-H": "high-grade",
    "HSIL": "high-grade",
    "SCC": "high-grade",
}

# CRIC Cervix (Rezende et al. 2021): the six Bethesda categories of its classification table,
# in the order of the platform's lesion ids (1 NILM ... 6 SCC); the TFDS label order.
CRIC = Taxonomy(
    class_names=_CRIC_CLASSES,
    abnormal=_CRIC_CLASSES[1:],
    views={
        "2class": {
            "names": ("normal", "abnormal"),
            "of": {c: "normal" if c == "NILM" else "abnormal" for c in _CRIC_CLASSES},
        },
        # The 3-class problem of the CRIC authors (Diniz et al., J. Imaging 2021).
        "3class": {"names": ("normal", "low-grade", "high-grade"), "of": _CRIC_3CLASS},
    },
    # The classes are Bethesda categories already.
    readings={
        "NILM": "NILM (negative for intraepithelial lesion or malignancy)",
        "ASC-US": "ASC-US (atypical squamous cells of undetermined significance)",
        "LSIL": "LSIL (low-grade squamous intraepithelial lesion)",
        "ASC-H": "ASC-H (atypical squamous cells, cannot exclude HSIL)",
        "HSIL": "HSIL (high-grade squamous intraepithelial lesion)",
        "SCC": "SCC (squamous cell carcinoma)",
    },
    dataset="cric",
)

_REGISTRY = {"sipakmed": SIPAKMED, "herlev": HERLEV, "cric": CRIC}


def for_dataset(name: str) -> Taxonomy:
    """The taxonomy of the dataset `name` (as `config.dataset` names it)."""
    if name not in _REGISTRY:
        raise ValueError(f"no taxonomy for dataset {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def for_class_names(class_names: Sequence[str], dataset: str = "") -> Taxonomy:
    """The known dataset's taxonomy with exactly these class names in this order, else a bare
    one: how model metadata written before taxonomies existed (class names only) gets one."""
    names = tuple(class_names)
    for tax in _REGISTRY.values():
        if tax.class_names == names:
            return tax
    return Taxonomy.bare(names, dataset)


def as_taxonomy(taxonomy_or_class_names) -> Taxonomy:
    """A `Taxonomy` as is; a plain list of class names as a bare taxonomy (no clinical meaning)."""
    if isinstance(taxonomy_or_class_names, Taxonomy):
        return taxonomy_or_class_names
    return Taxonomy.bare(taxonomy_or_class_names)
