"""The SIPaKMeD classes and their clinical groupings, in one place.

Every module that names a class (the TFDS builder, metrics, prediction, the report) imports
these tuples; the order is the label index everywhere (TFDS `label`, logits, jsonl
`probabilities`). Alphabetical, as the official archive names `im_<Class>.7z` sort.
"""

CLASS_NAMES = (
    "Dyskeratotic",
    "Koilocytotic",
    "Metaplastic",
    "Parabasal",
    "Superficial-Intermediate",
)
NUM_CLASSES = len(CLASS_NAMES)

# The dataset's official 3-class grouping (Plissiti et al. 2018).
CLASS_NAMES_3 = ("normal", "benign", "abnormal")
TO_3CLASS = {
    "Superficial-Intermediate": "normal",
    "Parabasal": "normal",
    "Metaplastic": "benign",
    "Koilocytotic": "abnormal",
    "Dyskeratotic": "abnormal",
}

# The common 2-class view: Metaplastic counts as normal (some public code puts it in
# "abnormal"; we do not).
CLASS_NAMES_2 = ("normal", "abnormal")
TO_2CLASS = {name: ("abnormal" if g == "abnormal" else "normal") for name, g in TO_3CLASS.items()}

# What a cytopathologist would write (The Bethesda System); see README "Clinical reading".
BETHESDA = {
    "Superficial-Intermediate": "NILM (mature squamous cells)",
    "Parabasal": "NILM (immature squamous cells, atrophy pattern)",
    "Metaplastic": "NILM (squamous metaplasia)",
    "Koilocytotic": "LSIL (HPV cytopathic effect); ASC-US if equivocal",
    "Dyskeratotic": "LSIL spectrum / ASC-US; marked atypia may suggest HSIL",
}

# Class indices counted as abnormal (the costly false negatives).
ABNORMAL = tuple(i for i, n in enumerate(CLASS_NAMES) if TO_2CLASS[n] == "abnormal")
LABEL_3CLASS = tuple(CLASS_NAMES_3.index(TO_3CLASS[n]) for n in CLASS_NAMES)
LABEL_2CLASS = tuple(CLASS_NAMES_2.index(TO_2CLASS[n]) for n in CLASS_NAMES)
