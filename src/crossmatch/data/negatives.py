"""A rule-based caption perturber: negatives that keep a caption's words and change what it says.

The compositional hard negatives of NegCLIP (Yuksekgonul et al., "When and why vision-language models behave
like bags of words, and what to do about it?", ICLR 2023) and the swap / replace perturbations that
SugarCrepe (Hsieh et al., NeurIPS 2023 Datasets and Benchmarks) evaluates, written as four small rules over a
shallow parse of an English caption:

    swap_attributes    "a red circle and a blue square"   -> "a blue circle and a red square"
    swap_relation      "a circle left of a square"        -> "a square left of a circle"
    flip_relation      "a circle left of a square"        -> "a circle right of a square"
    replace_attribute  "a red apple"                      -> "a green apple"

The parse knows a small lexicon (colours and sizes with their synonyms, spatial and comparative relation
phrases, determiners, a few linking verbs) and finds noun phrases with a heuristic: a determiner, then words
up to a function word, a relation phrase, a verb-like word or punctuation; the last word is the head noun
(an `-ing` word or a third-person `-s` verb after a noun ends the phrase, so "the dog jumps over a fence" has
no relation between two noun phrases). A relation counts only as ``NP [linking verb] RELATION NP`` between two
object noun phrases ("the left lane" or "a car on the left" state no relation between two objects). Later
definite mentions ("the red circle") are resolved to the earlier mention whose attributes they repeat, so a
swap or a replacement changes every mention of an object together.

Every rule changes exactly one thing, so its output is false of an image the caption is true of; a rule
that cannot be applied unambiguously (two objects with the same description, an attribute word twice in one
phrase, an ambiguous reference) yields nothing rather than a doubtful negative. Outputs never equal the
caption or each other (compared without case, spacing and final punctuation); capitals and punctuation are
kept. `perturb(caption, k, seed)` picks k of them, round-robin over the types, as a pure function of
(caption, k, seed).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import NamedTuple

# The perturbation types, one spelling for the perturber, the shapes generator's exact negatives and
# `crossmatch evaluate --negatives`.
SWAP_ATTRIBUTES = "swap_attributes"  # two objects exchange their colour (or size) words
SWAP_RELATION = "swap_relation"  # the two sides of a relation change places ("X left of Y" -> "Y left of X")
FLIP_RELATION = "flip_relation"  # a relation word becomes its opposite (left/right, above/below)
REPLACE_ATTRIBUTE = "replace_attribute"  # one object's colour (or size) becomes another value
TYPES = (SWAP_ATTRIBUTES, SWAP_RELATION, FLIP_RELATION, REPLACE_ATTRIBUTE)


class Negative(NamedTuple):
    """One perturbed caption and the rule that made it (one of `TYPES`)."""

    text: str
    type: str


# word -> class; the first word of each class is the one a replacement writes
_COLOUR_CLASSES = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "cobalt"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange", "tangerine"),
    "white": ("white", "snowy"),
    "black": ("black", "ebony"),
    "pink": ("pink",),
    "brown": ("brown",),
    "grey": ("grey", "gray"),
}
_SIZE_CLASSES = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge", "giant")}
ATTRIBUTES: dict[str, dict[str, str]] = {  # kind -> word -> class
    "colour": {w: c for c, words in _COLOUR_CLASSES.items() for w in words},
    "size": {w: c for c, words in _SIZE_CLASSES.items() for w in words},
}
CANONICAL = {
    "colour": {c: ws[0] for c, ws in _COLOUR_CLASSES.items()},
    "size": {c: ws[0] for c, ws in _SIZE_CLASSES.items()},
}

# Relation phrase -> its opposite. Longest phrases match first.
RELATIONS: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "on the left of": "on the right of",
    "on the right of": "on the left of",
    "on the left side of": "on the right side of",
    "on the right side of": "on the left side of",
    "above": "below",
    "below": "above",
    "over": "under",
    "under": "over",
    "beneath": "above",
    "underneath": "on top of",
    "on top of": "underneath",
    "higher than": "lower than",
    "lower than": "higher than",
    "in front of": "behind",
    "behind": "in front of",
    "bigger than": "smaller than",
    "larger than": "smaller than",
    "smaller than": "bigger than",
    "taller than": "shorter than",
    "shorter than": "taller than",
}  # no bare "on": "a play on the name", "two squares on the first move" relate no two objects
_REL_TOKENS = sorted((tuple(p.split()) for p in RELATIONS), key=len, reverse=True)
DETERMINERS = set("a an the one two three four five some several many another this that these those".split())
_PLURAL_DETS = {"two", "three", "four", "five", "some", "several", "many", "these", "those"}
LINKERS = set(
    "is are was were sits sit stands stand lies lie sitting standing lying placed located positioned "
    "appears which that".split()
)
# Words that end a noun phrase (besides determiners, linkers, relation phrases and punctuation).
FUNCTION_WORDS = set(
    "and or but with without of in at by for from to into onto near next beside between as while where "
    "who whose its his her their our your my it he she they we you i has have had be been not no also "
    "well just there here so than then on up down off out about around through against along across among "
    "all each every both only if because can will would should could do does did".split()
)
# Heads that name a place in the picture, not an object: "a car on the left" relates no two objects.
NON_OBJECT_HEADS = set(
    "left right top bottom side front back middle center centre picture image photo background foreground "
    "distance corner edge way own".split()
)
ING_NOUNS = set(
    "building ring king thing painting drawing string wing swing ceiling evening morning spring sibling "
    "pudding earring wedding clothing sling".split()
)
_LOWERCASE_FIRST = DETERMINERS | LINKERS | FUNCTION_WORDS | set(ATTRIBUTES["colour"]) | set(ATTRIBUTES["size"])

_TOKEN = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*|\d+|\s+|[^\w\s]|_")


def _is_attribute(word: str) -> bool:
    return any(word in lex for lex in ATTRIBUTES.values())


@dataclass
class _Mention:
    start: int  # token range [start, end) of the noun phrase, determiner included
    end: int
    head: str  # lower-case head noun
    definite: bool  # determiner "the"
    attrs: dict[str, list[int]]  # kind -> token indices of its attribute words inside the phrase
    entity: int = -1

    def classes(self, tokens_lc: list[str]) -> dict[str, str]:
        """kind -> attribute class of the phrase (kinds with exactly one word)."""
        return {k: ATTRIBUTES[k][tokens_lc[ix[0]]] for k, ix in self.attrs.items() if len(ix) == 1}


class _Parse:
    """Tokens, noun-phrase mentions resolved to entities, and NP-relation-NP triples of one caption."""

    def __init__(self, caption: str):
        self.tokens = _TOKEN.findall(caption)
        self.capital = bool(self.tokens) and self.tokens[0][:1].isupper()
        words = [i for i, t in enumerate(self.tokens) if not t.isspace()]
        first = self.tokens[words[0]] if words else ""
        if first.lower() in _LOWERCASE_FIRST and first == first.capitalize():
            self.tokens[words[0]] = self.tokens[words[0]].lower()  # "A red ..." -> "a red ...": may move inside
        self.lc = [t.lower() for t in self.tokens]
        self.words = words  # token indices of the non-space tokens
        self.mentions: list[_Mention] = []
        self.relations: list[tuple[int, tuple[int, int], int]] = []  # (mention a, rel token range, mention b)
        self.ambiguous = False
        self._find_mentions()
        self._resolve()
        self._find_relations()

    # ---- noun phrases ------------------------------------------------------------------------------
    def _relation_at(self, w: int) -> int:
        """Number of word positions the longest relation phrase starting at word position w spans (0: none)."""
        for phrase in _REL_TOKENS:
            if tuple(self.lc[i] for i in self.words[w : w + len(phrase)]) == phrase:
                return len(phrase)
        return 0

    def _is_word(self, w: int) -> bool:
        return w < len(self.words) and self.tokens[self.words[w]][0].isalpha()

    def _find_mentions(self) -> None:
        w, n = 0, len(self.words)
        while w < n:
            lc = self.lc[self.words[w]]
            starts_bare = lc in ATTRIBUTES["colour"] or lc in ATTRIBUTES["size"]
            prev = self.lc[self.words[w - 1]] if w else ""
            if lc in DETERMINERS or (starts_bare and (w == 0 or prev in {"and", ",", "with", "of"})):
                end = self._phrase_end(w + (lc in DETERMINERS), plural=lc in _PLURAL_DETS)
                span = range(w + (lc in DETERMINERS), end)
                if span:
                    self._add_mention(w, end, span, definite=lc == "the")
                    w = end
                    continue
            w += 1

    def _phrase_end(self, w: int, plural: bool) -> int:
        """Word position just after the noun phrase whose first word after the determiner is at w."""
        first, n = w, len(self.words)
        while w < n and self._is_word(w):
            lc = self.lc[self.words[w]]
            if lc in DETERMINERS or lc in LINKERS or lc in FUNCTION_WORDS or self._relation_at(w):
                break
            attribute = lc in ATTRIBUTES["colour"] or lc in ATTRIBUTES["size"]
            if w > first and not attribute:
                prev = self.lc[self.words[w - 1]]
                prev_attr = prev in ATTRIBUTES["colour"] or prev in ATTRIBUTES["size"]
                if lc.endswith("ing") and lc not in ING_NOUNS:
                    break  # "a man sitting ..."
                if lc.endswith("s") and not lc.endswith("ss") and not (plural or prev_attr):
                    break  # "the dog jumps ...": a verb after a noun
            w += 1
        return w

    def _add_mention(self, start: int, end: int, span: range, definite: bool) -> None:
        head = self.lc[self.words[span[-1]]]
        after = [self.lc[self.words[w]] for w in range(end, min(end + 2, len(self.words)))]
        if _is_attribute(head) and len(after) == 2 and after[0] in ("and", "or", ",") and _is_attribute(after[1]):
            self.ambiguous = True  # "a red and white flower": coordinated attributes, not an object named "red"
        if head in NON_OBJECT_HEADS:
            return
        attrs: dict[str, list[int]] = {}
        for w in span[:-1]:  # the head itself is never an attribute: "an orange"
            ti = self.words[w]
            for kind, lex in ATTRIBUTES.items():
                if self.lc[ti] in lex:
                    attrs.setdefault(kind, []).append(ti)
        self.mentions.append(_Mention(self.words[start], self.words[end - 1] + 1, head, definite, attrs))

    def _resolve(self) -> None:
        """Entities: a definite mention joins the unique earlier entity with its head and attributes."""
        self.entities: list[list[int]] = []
        for mi, m in enumerate(self.mentions):
            mine = m.classes(self.lc)
            if len(mine) != len(m.attrs):
                self.ambiguous = True  # "a red blue ball": an attribute kind twice in one phrase
            found = []
            if m.definite:
                for ei, ent in enumerate(self.entities):
                    first = self.mentions[ent[0]]
                    theirs = first.classes(self.lc)
                    if first.head == m.head and all(theirs.get(k) == c for k, c in mine.items()):
                        found.append(ei)
            if len(found) > 1:
                self.ambiguous = True
            if found:
                m.entity = found[0]
                self.entities[found[0]].append(mi)
            else:
                m.entity = len(self.entities)
                self.entities.append([mi])

    def _find_relations(self) -> None:
        """NP [linker]* RELATION NP, both phrases objects; relation phrases joined by "and" form one relation."""
        by_start = {m.start: i for i, m in enumerate(self.mentions)}
        word_pos = {t: w for w, t in enumerate(self.words)}
        for a, m in enumerate(self.mentions):
            w = word_pos[m.end - 1] + 1
            while w < len(self.words) and self.lc[self.words[w]] in LINKERS and self.lc[self.words[w]] != "that":
                w += 1
            parts = []
            while (size := self._relation_at(w)) > 0:
                parts.append((self.words[w], self.words[w + size - 1] + 1))
                w += size
                if w < len(self.words) and self.lc[self.words[w]] == "and" and self._relation_at(w + 1):
                    w += 1
                    continue
                break
            if parts and w < len(self.words) and self.words[w] in by_start:
                for part in parts:
                    self.relations.append((a, part, by_start[self.words[w]]))

    # ---- output ------------------------------------------------------------------------------------
    def render(self, tokens: list[str], changed: list[int] = ()) -> str:
        """The caption from edited tokens; "a"/"an" before a `changed` token agrees with its new first letter."""
        tokens = list(tokens)
        for t in changed:
            before = [i for i in range(t) if not tokens[i].isspace()]
            if before and tokens[before[-1]].lower() in ("a", "an"):
                article = "an" if tokens[t][:1].lower() in "aeiou" else "a"
                tokens[before[-1]] = _match_case(article, tokens[before[-1]])
        text = "".join(tokens)
        return text[:1].upper() + text[1:] if self.capital else text

    def entity_key(self, ent: int, classes: dict[int, dict[str, str]] | None = None) -> tuple:
        """What an entity says: its head and attribute classes (over all its mentions)."""
        cls: dict[str, str] = {}
        for mi in self.entities[ent]:
            cls.update(self.mentions[mi].classes(self.lc))
        if classes and ent in classes:
            cls.update(classes[ent])
        return (self.mentions[self.entities[ent][0]].head, tuple(sorted(cls.items())))


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _entity_words(p: _Parse, ent: int, kind: str) -> list[int] | None:
    """Token indices of the `kind` attribute words of every mention of an entity; None if it has none."""
    ix = [p.mentions[mi].attrs[kind][0] for mi in p.entities[ent] if kind in p.mentions[mi].attrs]
    return ix or None


def _swap_attributes(p: _Parse) -> list[str]:
    out = []
    for kind in ATTRIBUTES:
        for e1 in range(len(p.entities)):
            for e2 in range(e1 + 1, len(p.entities)):
                w1, w2 = _entity_words(p, e1, kind), _entity_words(p, e2, kind)
                if not (w1 and w2):
                    continue
                c1, c2 = ATTRIBUTES[kind][p.lc[w1[0]]], ATTRIBUTES[kind][p.lc[w2[0]]]
                if c1 == c2:
                    continue
                before = sorted(p.entity_key(e) for e in range(len(p.entities)))
                after = sorted(p.entity_key(e, {e1: {kind: c2}, e2: {kind: c1}}) for e in range(len(p.entities)))
                if before == after:  # "a small red circle and a small blue circle": the same two objects
                    continue
                tokens = list(p.tokens)
                for mine, other in ((w1, w2), (w2, w1)):
                    for t in mine:
                        tokens[t] = _match_case(p.lc[other[0]], p.tokens[t])
                out.append(p.render(tokens, w1 + w2))
    return out


def _replace_attribute(p: _Parse) -> list[str]:
    out = []
    for kind, canon in CANONICAL.items():
        for ent in range(len(p.entities)):
            words = _entity_words(p, ent, kind)
            if not words:
                continue
            own = ATTRIBUTES[kind][p.lc[words[0]]]
            others = {p.entity_key(e) for e in range(len(p.entities)) if e != ent}
            for cls, word in canon.items():
                if cls == own or p.entity_key(ent, {ent: {kind: cls}}) in others:
                    continue  # "a red circle and a blue circle": no second blue circle
                tokens = list(p.tokens)
                for t in words:
                    tokens[t] = _match_case(word, p.tokens[t])
                out.append(p.render(tokens, words))
    return out


def _swap_relation(p: _Parse) -> list[str]:
    out = []
    for a, _, b in p.relations:
        ma, mb = p.mentions[a], p.mentions[b]
        if p.entity_key(ma.entity) == p.entity_key(mb.entity):
            continue  # "a circle above a circle"
        t = p.tokens
        out.append(
            p.render(t[: ma.start] + t[mb.start : mb.end] + t[ma.end : mb.start] + t[ma.start : ma.end] + t[mb.end :])
        )
    return out


def _flip_relation(p: _Parse) -> list[str]:
    out = []
    for a, (s, e), b in p.relations:
        if p.entity_key(p.mentions[a].entity) == p.entity_key(p.mentions[b].entity):
            continue  # "a circle above a circle" says what "a circle below a circle" says
        flipped = RELATIONS[" ".join(p.lc[i] for i in range(s, e) if not p.lc[i].isspace())]
        out.append(p.render(p.tokens[:s] + [_match_case(flipped, p.tokens[s])] + p.tokens[e:]))
    return out


_RULES = {
    "swap_attributes": _swap_attributes,
    "swap_relation": _swap_relation,
    "flip_relation": _flip_relation,
    "replace_attribute": _replace_attribute,
}


def normalise(text: str) -> str:
    """Comparison form of a caption: lower case, single spaces, no final punctuation."""
    return " ".join(text.lower().split()).rstrip(" .!?;:,")


@functools.lru_cache(maxsize=65536)
def candidates(caption: str) -> tuple[Negative, ...]:
    """Every negative the rules make of `caption`, in a fixed order (by type, then by position); none equals
    the caption or an earlier one. Empty when no rule applies."""
    p = _Parse(caption)
    if p.ambiguous:
        return ()
    seen, out = {normalise(caption)}, []
    for kind, rule in _RULES.items():
        if kind in ("swap_relation", "flip_relation") and not p.relations:
            continue
        for text in rule(p):
            if normalise(text) not in seen:
                seen.add(normalise(text))
                out.append(Negative(text, kind))
    return tuple(out)


def pick(negatives: list[Negative] | tuple[Negative, ...], k: int, seed: int) -> list[Negative]:
    """k of `negatives`, round-robin over their types in a seeded order (so k small still mixes the rules),
    each type's own list shuffled by the same seed. A pure function of (negatives, k, seed)."""
    if k <= 0 or not negatives:
        return []
    rng = random.Random(seed)
    groups: dict[str, list[Negative]] = {}
    for neg in negatives:
        groups.setdefault(neg.type, []).append(neg)
    order = sorted(groups)
    rng.shuffle(order)
    for kind in order:
        rng.shuffle(groups[kind])
    out: list[Negative] = []
    while len(out) < k and any(groups.values()):
        for kind in order:
            if groups[kind] and len(out) < k:
                out.append(groups[kind].pop(0))
    return out


def perturb(caption: str, k: int, seed: int) -> list[Negative]:
    """Up to k negatives of `caption` (fewer when the rules make fewer; none when no rule applies).

    Args:
        caption: an English caption; capitals and final punctuation are kept.
        k: how many negatives at most.
        seed: the choice among the candidates is a pure function of (caption, k, seed).
    Returns:
        Distinct `Negative(text, type)`, none equal to the caption.
    """
    return pick(candidates(caption), k, seed)
