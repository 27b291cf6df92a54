"""Local scorers for answer files, by the rules of EVE's own evaluation code (LLaVA-1.5's):

  VQA-style (TextVQA, VQAv2 val): m4c's TextVQAAccuracyEvaluator with EvalAI's answer processor,
    whose first step (word_tokenize) lowercases, deletes "," and "?" and splits "'s" into " 's";
  POPE: eval_pope.py reads the first sentence, deletes ",", splits on the space character only and
    answers "no" when "No", "no" or "not" is a word; metrics per category (LLaVA-1.5 / EVE report
    their mean) and pooled;
  ScienceQA: eval_science_qa.py accepts a bare option letter, "X. ...", or exactly one
    "The answer is X." match; anything else (and an unanswered question) is wrong;
  SEED-Bench: convert_seed_for_submission.py compares the answer text, untouched, to the option
    letter (`text == answer`);
  GQA: convert_gqa_for_eval.py turns an answer into `text.rstrip('.').lower()` and GQA's eval.py
    compares that to the question's answer exactly;
  MME: convert_answer_to_mme.py finds the question by its prompt, and the official eval_tool's
    calculation.py reads the answer lower-cased: "yes" / "no" when "yes" (first) or "no" occurs in
    its first 4 characters, else "other" (always wrong);
  TextVQA: eval_textvqa.py finds an answer's annotation by (question_id = image id, the question
    its prompt_processor reads from the prompt), then scores as VQA-style above.

`lenient=True` gives friendlier parsing (whitespace splits, more option formats, no tokenisation
step); results computed so must be reported as such."""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence

from megatron_eve.eval.prompts import SHORT_SUFFIX

# The VQA evaluation's normalisation tables (vqaEval.py of the VQA API).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or (re.search(_COMMA_STRIP, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _word_tokenize(text: str) -> str:
    """EvalAIAnswerProcessor.word_tokenize, the step EVE's evaluator runs first."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def normalize_vqa_answer(text: str, lenient: bool = False) -> str:
    """EvalAIAnswerProcessor.__call__ (lenient: without its word_tokenize step)."""
    if not lenient:
        text = _word_tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], lenient: bool = False) -> float:
    """The official VQA accuracy: mean over the annotators of min(1, matches among the others / 3)
    (m4c's formula); a single reference answer is an exact match."""
    prediction = normalize_vqa_answer(prediction, lenient)
    gold = [normalize_vqa_answer(a, lenient) for a in answers]
    if len(gold) == 1:
        return float(prediction == gold[0])
    scores = []
    for i in range(len(gold)):
        others = gold[:i] + gold[i + 1:]
        scores.append(min(1.0, sum(1 for a in others if a == prediction) / 3.0))
    return sum(scores) / len(scores)


def yes_no(text: str, lenient: bool = False) -> str:
    """POPE's reading of an answer (eval_pope.py): the first sentence, commas deleted, words split
    on " " alone (so "No\n" is not the word "No"); "No" / "no" / "not" → no, anything else → yes."""
    first = text.split(".")[0].replace(",", "")
    words = first.split() if lenient else first.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Iterable[Optional[str]], labels: Iterable[str], lenient: bool = False
                 ) -> Dict[str, float]:
    """eval_pope.py's figures of one set of answers. An unanswered question (None: no answer, or one
    that failed) is wrong: read as the opposite of its label (an FN for "yes", an FP for "no")."""
    labels = [label.strip().lower() for label in labels]
    predictions = [("yes" if g == "no" else "no") if p is None else yes_no(p, lenient)
                   for p, g in zip(predictions, labels)]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(predictions, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(predictions, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(predictions, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(predictions, labels))
    total = max(len(labels), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / total, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": predictions.count("yes") / total}


SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def sqa_letter(text: str, num_choices: Optional[int] = None) -> Optional[str]:
    """The option eval_science_qa.py reads from an answer: the text is exactly a letter, or starts
    "X. ", or holds exactly one "The answer is X." (any character after X); the letter must be one
    of the question's options. None: no valid option (scored wrong)."""
    if text in SQA_OPTIONS:
        answer = text
    elif len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        answer = text[0]
    else:
        found = _SQA_ANSWER_IS.findall(text)
        answer = found[0] if len(found) == 1 else None
    allowed = SQA_OPTIONS[:num_choices] if num_choices else SQA_OPTIONS
    return answer if answer in allowed else None


def choice_letter(text: str, letters: str = "ABCDEFGH") -> Optional[str]:
    """Lenient reading of an option letter: "B", "B.", "(B)", "B) ...", "The answer is B"."""
    text = text.strip()
    match = re.match(rf"^\(?([{letters}])(?:[\).:,\s]|$)", text)
    if match:
        return match.group(1)
    match = re.search(rf"\b([{letters}])\b", text)
    return match.group(1) if match else None


def multiple_choice_accuracy(predictions: Iterable[str], answers: Iterable[str],
                             num_choices: Optional[Sequence[Optional[int]]] = None, lenient: bool = False) -> float:
    """Share of questions whose answer gives the right option letter (EVE's ScienceQA parser, or
    the lenient one)."""
    pairs = list(zip(predictions, answers))
    counts = list(num_choices) if num_choices is not None else [None] * len(pairs)
    read = (lambda text, n: choice_letter(text)) if lenient else sqa_letter
    return sum(read(p, n) == a.strip().upper() for (p, a), n in zip(pairs, counts)) / max(len(pairs), 1)


def mean(values: List[float]) -> float:
    return sum(values) / max(len(values), 1)


def ratio(right: int, total: int) -> Optional[float]:
    """right / total; None when there is nothing to count."""
    return right / total if total else None


def seed_correct(text: str, answer: str, lenient: bool = False) -> bool:
    """SEED-Bench: the answer text as the model wrote it equals the option letter (nothing is
    stripped: "A." or " A" is wrong). Lenient: the option letter read by `choice_letter`."""
    if lenient:
        return choice_letter(text, "ABCD") == answer
    return text == answer


def gqa_prediction(text: str, lenient: bool = False) -> str:
    """GQA: what convert_gqa_for_eval.py writes for an answer: trailing periods removed, then
    lower-cased; whitespace is kept ("Yes. " stays "yes. "). Lenient: whitespace stripped too."""
    if lenient:
        return text.strip().rstrip(".").strip().lower()
    return text.rstrip(".").lower()


MME_YES_NO = "Please answer yes or no."


def mme_question_candidates(prompt: str) -> List[str]:
    """The question text(s) under which convert_answer_to_mme.py looks an answer's prompt up in
    MME's ground-truth files: the short-answer suffix removed (and only then stripped); without
    "Please answer yes or no." it adds " Please answer yes or no.", and when that is not found, the
    same with two spaces (some of MME's files have two). The first candidate found is used."""
    question = prompt
    if SHORT_SUFFIX in question:
        question = question.replace(SHORT_SUFFIX, "").strip()
    if MME_YES_NO in question:
        return [question]
    question = question + " " + MME_YES_NO
    return [question, question.replace(" " + MME_YES_NO, "  " + MME_YES_NO)]


def mme_label(text: str, lenient: bool = False) -> str:
    """MME: "yes", "no" or "other" as calculation.py reads the answer: lower-cased, "yes" when its
    first 4 characters contain "yes", else "no" when they contain "no" (so "nope", "(no)" and "snow"
    are "no", "eyes" is "yes", "   no" and "The answer is no" are "other"). Lenient: the first word
    "yes" or "no" anywhere in the answer."""
    if lenient:
        words = [w for w in re.findall(r"[a-z]+", text.lower()) if w in ("yes", "no")]
        return words[0] if words else "other"
    prefix = text.lower()[:4]
    if "yes" in prefix:
        return "yes"
    return "no" if "no" in prefix else "other"


_TEXTVQA_BLIP_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def textvqa_question(prompt: str) -> Optional[str]:
    """eval_textvqa.py's prompt_processor: the question an answer's prompt asks, lower-cased.
    A BLIP-style prompt ("OCR tokens: ... Question: <q> Short answer:") gives <q>; a 3-line prompt
    holding "Reference OCR token: " gives line 2 when it starts with "Reference OCR token:", else
    line 1; any other 2-line prompt gives line 1 (the question before the instruction). Nothing is
    stripped. None where the script stops the run: any other prompt (its `assert False`), or an
    "OCR tokens: " prompt without "Question: ... Short answer:" (its match is None)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _TEXTVQA_BLIP_QUESTION.search(prompt)
        if match is None:
            return None
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        return None
    return question.lower()
