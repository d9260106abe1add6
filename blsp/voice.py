"""What a clip's voice is, beyond its words: attributes, their description, the questions about them.

The corpus builder (blsp.corpus) records each clip's voice attributes as manifest fields, the
values below. Step 1 (blsp.continuation) turns them into a one-sentence description that the LLM
reads beside the transcript, and answers the questions of VOICE_QUESTIONS from it, so that step 2
learns answers only an adapter that carries the voice can give (DeSTA2.5's self-generated
targets). The voice evaluation (recipes/eval/voice.yaml) asks the same questions on voices never
heard in training, with the description's row as the ceiling and the cascade as the floor.

A field a line lacks is unknown, not "no": a real clip's noise level is not known, and its
description says nothing about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Bands the corpus draws each clip's speed from, by class (blsp.corpus). The gaps between them keep
# a class an audible fact, not a coin flip at a threshold. `duration_stretch` > 1 is slower.
RATE_BANDS: dict[str, tuple[float, float]] = {"fast": (0.6, 0.72), "normal": (0.9, 1.1), "slow": (1.4, 1.65)}
# Bands of `pitch_scale` (times the voice's own mean F0) the corpus draws from, to spread each
# voice's pitch; the class a clip states is then its measured pitch (PITCH_HZ), not the draw: a
# band relative to a voice nobody has heard cannot be heard (a linear probe on Whisper's states
# named it in 63% of unseen-voice clips, the measured one in 93%; 2026-12-07).
PITCH_BANDS: dict[str, tuple[float, float]] = {"low": (0.68, 0.78), "normal": (0.95, 1.05), "high": (1.3, 1.45)}
# The pitch classes by the clip's median F0 (Hz, blsp.audio.median_f0), with gaps between them
# (2-3 semitones) where a clip states no pitch: low is a deep man's voice, high most women's.
# Measured, so that a recording of a real voice is labelled the same way.
PITCH_HZ: dict[str, tuple[float, float]] = {"low": (0.0, 100.0), "normal": (115.0, 155.0), "high": (175.0, 1000.0)}
# Pink noise this far below the speech (dB) makes a clip "noisy"; a clean clip has none added.
# 5-15 dB: plainly audible noise in which Whisper-base keeps most words (on awb: WER 0.29 at 15 dB,
# 0.31 at 10, 0.41 at 5, 0.57 at 0 dB where the clean clips read perfectly).
NOISY_SNR_DB = (5.0, 15.0)


@dataclass(frozen=True)
class VoiceAttribute:
    """One attribute: the manifest field holding it, its classes, the question that asks it."""

    field: str
    labels: tuple[str, ...]
    question: str
    # how each class reads in a description ("a woman", "fast"); None: the class goes unsaid
    phrases: tuple[str | None, ...]
    # one word per class, the one its question offers where it can ("male or female"): the voice
    # channel's vector for the attribute starts as the mix of these words' embeddings that its
    # classifier's posterior gives (blsp.voice_channel)
    words: tuple[str, ...]


VOICE_ATTRIBUTES: dict[str, VoiceAttribute] = {
    a.field: a for a in (
        VoiceAttribute("gender", ("male", "female"),
                       "Is the speaker male or female? Answer with one word: male or female.",
                       ("a man", "a woman"), ("male", "female")),
        VoiceAttribute("rate", ("slow", "normal", "fast"),
                       "Does the speaker talk slowly, at a normal pace, or fast? Answer with one word: slow, normal "
                       "or fast.",
                       ("slowly", "at a normal pace", "fast"), ("slow", "normal", "fast")),
        VoiceAttribute("pitch", ("low", "normal", "high"),
                       "Is the speaker's voice low, normal or high in pitch? Answer with one word: low, normal or "
                       "high.",
                       ("in a low-pitched voice", "in a voice of normal pitch", "in a high-pitched voice"),
                       ("low", "normal", "high")),
        VoiceAttribute("whispered", ("yes", "no"),
                       "Is the speaker whispering? Answer with one word: yes or no.",
                       ("whispering", None), ("whispering", "talking")),
        VoiceAttribute("noisy", ("yes", "no"),
                       "Is there loud background noise in the recording? Answer with one word: yes or no.",
                       ("over loud background noise", "in a quiet room"), ("noisy", "quiet")),
    )
}
# The free-form question; its answers are scored by the keywords each attribute's class implies
# (`describes`).
DESCRIBE_QUESTION = "Describe the speaker's voice in one sentence."
# Words that name a class in a free-form description (lower case, whole words).
KEYWORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "gender": {"male": ("man", "male", "he", "his", "gentleman", "boy"),
               "female": ("woman", "female", "she", "her", "lady", "girl")},
    "rate": {"slow": ("slow", "slowly"), "fast": ("fast", "quick", "quickly", "rapid", "rapidly", "hurried")},
    "pitch": {"low": ("low", "low-pitched", "deep"), "high": ("high", "high-pitched", "shrill")},
    "whispered": {"yes": ("whisper", "whispers", "whispering", "whispered")},
    "noisy": {"yes": ("noise", "noisy", "loud background")},
}


def pitch_class(f0_hz: float | None) -> str | None:
    """A median F0's pitch class (PITCH_HZ), or None in the gaps between classes or without one."""
    if f0_hz is None:
        return None
    return next((name for name, (low, high) in PITCH_HZ.items() if low <= f0_hz <= high), None)


def voice_attributes(record: Mapping) -> dict[str, str]:
    """The attributes a manifest line states (field -> class), ignoring fields it lacks."""
    out = {}
    for name, attribute in VOICE_ATTRIBUTES.items():
        value = record.get(name)
        if isinstance(value, str) and value in attribute.labels:
            out[name] = value
    return out


def describe_voice(attributes: Mapping[str, str]) -> str | None:
    """One sentence a person would write about the voice, from what is known of it, e.g.
    "The speaker is a woman, whispering fast in a high-pitched voice over loud background noise."
    None when nothing is known."""
    said = {name: VOICE_ATTRIBUTES[name].phrases[VOICE_ATTRIBUTES[name].labels.index(value)]
            for name, value in attributes.items() if name in VOICE_ATTRIBUTES}
    said = {k: v for k, v in said.items() if v}
    if not said:
        return None
    who = said.pop("gender", "someone")
    # a whisperer is not also "talking": the whisper takes the verb's place
    verb = said.pop("whispered", "talking")
    how = [said[k] for k in ("rate", "pitch", "noisy") if k in said]
    if not how:
        return f"The speaker is {who}." if verb == "talking" else f"The speaker is {who}, {verb}."
    return f"The speaker is {who}, {verb} {' '.join(how)}."


def described_transcript(transcript: str, description: str | None) -> str:
    """What the text path reads where the speech would be, when the voice is described: the
    description, then the words in quotes (a stage direction, as a screenplay writes one)."""
    if not description:
        return transcript
    return f"{description} They say: \"{transcript.strip()}\""


def heard_with_voice(transcript: str, attributes: Mapping[str, str]) -> str:
    """What the text path reads for a clip of this voice: its description, then the transcript."""
    return described_transcript(transcript, describe_voice(attributes))


def voice_questions(attributes: Mapping[str, str]) -> dict[str, str]:
    """Task name -> question for the attributes a line states, plus the free-form description."""
    questions = {f"voice_{name}": VOICE_ATTRIBUTES[name].question for name in attributes}
    return {**questions, "voice_describe": DESCRIBE_QUESTION} if questions else {}


def _words(text: str) -> list[str]:
    # a possessive names its noun ("a woman's voice"; "she's" is "she")
    tokens = "".join(c.lower() if c.isalnum() or c in "-'" else " " for c in text).split()
    return [t[:-2] if t.endswith("'s") else t for t in tokens]


NEGATIONS = {"no", "not", "without", "never", "isn't", "doesn't", "nor"}
NEGATION_REACH = 3  # words before a keyword that a negation reaches ("not loud background noise")


def _said(words: list[str]) -> list[str]:
    # a keyword negated a few words before ("no background noise", "not whispering") is not said
    return [w for i, w in enumerate(words) if not NEGATIONS & set(words[max(0, i - NEGATION_REACH) : i])]


def _says(words: list[str], keywords: tuple[str, ...]) -> bool:
    text = f" {' '.join(words)} "
    return any((k in words) if " " not in k else (f" {k} " in text) for k in keywords)


def said_negated(answer: str, keywords: tuple[str, ...]) -> bool:
    """Whether the answer says one of `keywords` only under a negation ("not whispering")."""
    words = _words(answer)
    return _says(words, keywords) and not _says(_said(words), keywords)


def describes(answer: str, attribute: str, value: str) -> bool | None:
    """Whether a free-form description names `attribute` as `value`: it says a keyword of that
    class and none of another. None: the attribute has no keywords for that class (normal pace,
    no whisper), so the answer is not scored on it."""
    keys = KEYWORDS.get(attribute, {})
    if value not in keys:
        return None
    said = _said(_words(answer))
    return _says(said, keys[value]) and not any(_says(said, other) for label, other in keys.items() if label != value)


# ----------------------------------------------------------------------------------------------
# Step 1's targets about the voice: the LLM's own answer where it is right, else a plain one
# ----------------------------------------------------------------------------------------------
# Told the voice in a sentence beside the transcript, SmolLM2-135M names it right about as often as
# chance (24 voices x 5 attributes, 2026-12-06: gender 50%, rate 67%, pitch 0-38%, whispered 21%,
# noise 50-100%, by the prompt's form). Its answers alone would teach the adapter wrong facts; so
# each is checked against what the corpus knows, and a wrong one is replaced by the answer below,
# phrased as the LLM phrases a right one ("The speaker is female."). `written_by` in step 1's line
# says which it is, and the voice suite's `described` row measures the LLM's own rate.
PLAIN_ANSWERS: dict[str, dict[str, str]] = {
    "gender": {"male": "The speaker is male.", "female": "The speaker is female."},
    "rate": {"slow": "The speaker talks slowly.", "normal": "The speaker talks at a normal pace.",
             "fast": "The speaker talks fast."},
    "pitch": {"low": "The speaker's voice is low in pitch.", "normal": "The speaker's voice is normal in pitch.",
              "high": "The speaker's voice is high in pitch."},
    # A yes/no answer says what is heard first and the verdict after it: "Yes, ..." first, the
    # voice demo's model answered every clip alike ("Yes" to the noise question, "No" to the whisper
    # one) while its descriptions named the noise and the whisper right in every clip: stating the
    # class word (as a description does) and then the verdict is what it can learn (2026-12-07).
    "whispered": {"yes": "The speaker is whispering, so: yes.", "no": "The speaker is talking, not whispering, so: no."},
    "noisy": {"yes": "The recording is noisy, so: yes.", "no": "The recording is quiet, so: no."},
}


def plain_answer(task: str, attributes: Mapping[str, str]) -> str:
    """The answer step 1 trains on where the LLM's own is wrong: a plain statement of the fact."""
    name = task.removeprefix("voice_")
    if name in VOICE_ATTRIBUTES:
        return PLAIN_ANSWERS[name][attributes[name]]
    return describe_voice(attributes) or ""
