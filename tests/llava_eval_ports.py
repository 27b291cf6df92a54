"""LLaVA-1.5's / EVE's official evaluation scripts, ported to functions that return what the scripts
print (their arithmetic and lookups kept line for line), so that tests can put our scorers beside
them: llava/eval/eval_pope.py, scripts/convert_seed_for_submission.py, llava/eval/eval_science_qa.py."""

import json
import re


def eval_pope(answers, labels):
    """eval_pope.py's eval_pope: one category's answers (in order) against its label list →
    (f1, acc, precision, recall, yes_ratio)."""
    label_list = [0 if label == "no" else 1 for label in labels]
    pred_list = []
    for answer in answers:
        text = answer["text"]
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        pred_list.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
    yes_ratio = pred_list.count(1) / len(pred_list)
    tp = tn = fp = fn = 0
    for pred, label in zip(pred_list, label_list):
        if pred == 1 and label == 1:
            tp += 1
        elif pred == 1 and label == 0:
            fp += 1
        elif pred == 0 and label == 0:
            tn += 1
        elif pred == 0 and label == 1:
            fn += 1
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    return f1, (tp + tn) / (tp + tn + fp + fn), precision, recall, yes_ratio


def seed_accuracy(annotation_file, result_file, eval_only_type=None):
    """convert_seed_for_submission.py's eval_single (no --tolerance): the total accuracy (percent)."""
    data = json.load(open(annotation_file))
    results = {}
    for line in open(result_file):
        row = json.loads(line)
        results[row["question_id"]] = row
    total = correct = 0
    for question in data["questions"]:
        if eval_only_type is not None and question["data_type"] != eval_only_type:
            continue
        total += 1
        try:
            question_id = int(question["question_id"])
        except (TypeError, ValueError):  # the script's bare except
            question_id = question["question_id"]
        if question_id in results and results[question_id]["text"] == question["answer"]:
            correct += 1
    return correct / total * 100


def science_qa(base_dir, result_file, split="test", options=("A", "B", "C", "D", "E")):
    """eval_science_qa.py: (accuracy, IMG-accuracy), both percent; ZeroDivisionError where it stops."""
    split_indices = json.load(open(f"{base_dir}/pid_splits.json"))[split]
    problems = json.load(open(f"{base_dir}/problems.json"))
    predictions = {pred["question_id"]: pred for pred in (json.loads(line) for line in open(result_file))}
    correct, incorrect = [], []
    for prob_id in split_indices:
        prob = problems[prob_id]
        pred = predictions.get(prob_id, {"text": "FAILED", "prompt": "Unknown"})
        pred_text = pred["text"]
        if pred_text in options:
            answer = pred_text
        elif len(pred_text) >= 3 and pred_text[0] in options and pred_text[1:3] == ". ":
            answer = pred_text[0]
        else:
            res = re.compile(r"The answer is ([A-Z]).").findall(pred_text)
            answer = res[0] if len(res) == 1 else "FAILED"
        pred_idx = options.index(answer) if answer in options[:len(prob["choices"])] else -1
        (correct if pred_idx == prob["answer"] else incorrect).append("<image>" in pred["prompt"])
    multimodal_total = sum(correct) + sum(incorrect)
    return len(correct) / (len(correct) + len(incorrect)) * 100, sum(correct) / multimodal_total * 100
