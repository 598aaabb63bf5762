"""The official MMLU taxonomy: 57 subjects → 17 subcategories → 4 categories.

Source: the category table published with MMLU (Hendrycks et al., "Measuring Massive Multitask
Language Understanding", ICLR 2021). A *domain* in edgefuse is any of: a category (``stem``,
``humanities``, ``social_sciences``, ``other``), a subcategory (``math``, ``law`` …) or a subject.
"""

from __future__ import annotations

from edgefuse.errors import EdgefuseError

SUBJECT_TO_SUBCATEGORY: dict[str, str] = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer_science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer_science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer_science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer_science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}

SUBCATEGORY_TO_CATEGORY: dict[str, str] = {
    "physics": "stem", "chemistry": "stem", "biology": "stem", "computer_science": "stem", "math": "stem",
    "engineering": "stem", "history": "humanities", "philosophy": "humanities", "law": "humanities",
    "politics": "social_sciences", "culture": "social_sciences", "economics": "social_sciences",
    "geography": "social_sciences", "psychology": "social_sciences", "other": "other", "business": "other",
    "health": "other",
}

CATEGORIES = ("stem", "humanities", "social_sciences", "other")
SUBJECTS = tuple(sorted(SUBJECT_TO_SUBCATEGORY))
SUBCATEGORIES = tuple(sorted(SUBCATEGORY_TO_CATEGORY))


def category_of(subject: str) -> str:
    return SUBCATEGORY_TO_CATEGORY[SUBJECT_TO_SUBCATEGORY[subject]]


def normalise_subject(name: str) -> str:
    """'high school biology' / 'High-School Biology' → 'high_school_biology'."""
    return "_".join(name.strip().lower().replace("-", " ").split())


def is_domain(name: str) -> bool:
    """Whether ``name`` is an MMLU domain (category, subcategory or subject, in any spelling `normalise_subject`
    takes)."""
    d = normalise_subject(name)
    return d in CATEGORIES or d in SUBCATEGORY_TO_CATEGORY or d in SUBJECT_TO_SUBCATEGORY


def domain_subjects(domain: str) -> list[str]:
    """Subjects belonging to a domain (category, subcategory or subject name)."""
    d = normalise_subject(domain)
    if d in CATEGORIES:
        return [s for s in SUBJECTS if category_of(s) == d]
    if d in SUBCATEGORY_TO_CATEGORY:
        return [s for s in SUBJECTS if SUBJECT_TO_SUBCATEGORY[s] == d]
    if d in SUBJECT_TO_SUBCATEGORY:
        return [d]
    raise EdgefuseError(
        f"unknown domain {domain!r}; valid: categories {', '.join(CATEGORIES)}; "
        f"subcategories {', '.join(SUBCATEGORIES)}; or any of the 57 subject names"
    )


def check_subject(subject: str) -> str:
    s = normalise_subject(subject)
    if s not in SUBJECT_TO_SUBCATEGORY:
        raise EdgefuseError(f"unknown subject {subject!r}; valid: {', '.join(SUBJECTS)}")
    return s
