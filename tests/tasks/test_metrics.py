import pytest

from kvbench.tasks import metrics as m


def test_normalize_answer():
    assert m.normalize_answer("The  Eiffel Tower, in Paris!") == "eiffel tower in paris"
    assert m.normalize_answer("An apple a day") == "apple day"
    assert m.normalize_answer("") == ""
    assert m.normalize_zh_answer("北京， 是 中国的首都。") == "北京是中国的首都"
    assert m.normalize_zh_answer("A-B c") == "abc"


def test_qa_f1_score_by_hand():
    # pred tokens: eiffel tower ; ref: eiffel tower in paris -> P=1, R=1/2, F1=2/3
    assert m.qa_f1_score("The Eiffel Tower.", "the Eiffel tower in Paris") == pytest.approx(2 / 3)
    assert m.qa_f1_score("Paris", "Paris") == 1.0
    assert m.qa_f1_score("London", "Paris") == 0.0
    # repeated tokens count with multiplicity: pred a a b (articles removed -> "b b"?) use plain words
    assert m.qa_f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    # empty prediction / empty reference
    assert m.qa_f1_score("", "Paris") == 0.0
    assert m.qa_f1_score("Paris", "") == 0.0
    assert m.qa_f1_score("", "") == 0.0


def test_qa_f1_zh_score_by_hand():
    # jieba: 北京/是/中国/的/首都 vs 首都/是/北京 -> common 3, P=3/5, R=1, F1=0.75
    assert m.qa_f1_zh_score("北京是中国的首都", "首都是北京") == pytest.approx(0.75)
    assert m.qa_f1_zh_score("北京。", "北京") == 1.0  # punctuation dropped after the cut
    assert m.qa_f1_zh_score("", "北京") == 0.0
    assert m.qa_f1_zh_score("北京", "") == 0.0


def test_rouge_l():
    # LCS of "a b c d e" / "a b x d e" = 4 of 5 tokens -> P = R = F = 0.8
    assert m.rouge_score("a b c d e", "a b x d e") == pytest.approx(0.8, abs=1e-6)
    # LCS 2 (a, c): P = 2/2, R = 2/4 -> F = 2/3
    assert m.rouge_score("a c", "a b c d") == pytest.approx(2 / 3, abs=1e-6)
    assert m.rouge_score("abc", "abc") == pytest.approx(1.0, abs=1e-6)
    assert m.rouge_score("", "abc") == 0.0  # the package raises on an empty hypothesis: caught as 0
    assert m.rouge_score("abc", "") == 0.0


def test_rouge_zh():
    # jieba: 今天天气/很/好 vs 今天天气/不错: LCS 1, P=1/3, R=1/2 -> F=2/5
    assert m.rouge_zh_score("今天天气很好", "今天天气不错") == pytest.approx(0.4, abs=1e-6)
    assert m.rouge_zh_score("", "今天") == 0.0


def test_rouge_lsum_and_rouge1_recall():
    assert m.rouge_lsum_f("the cat sat\non the mat", "the cat\nsat on the mat") == pytest.approx(1.0)
    # ref "a b c d" (one sentence), pred "a b\nx d": union LCS {a,b,d} -> R=3/4, P=3/4
    assert m.rouge_lsum_f("a b\nx d", "a b c d") == pytest.approx(0.75)
    assert m.rouge_lsum_f("", "a b") == 0.0
    assert m.rouge1_recall("The magic number is 42.", "the number is 42") == 1.0
    assert m.rouge1_recall("number", "the number is 42") == 0.25
    assert m.rouge1_recall("anything", "") == 0.0
    assert m.rouge1_recall("", "x") == 0.0


def test_classification_score_official_logic():
    classes = ["Description of a person", "Individual", "Description of something", "Description", "City"]
    # 'Description' is a strict substring of the truth and is pruned -> only the truth left
    assert m.classification_score("Description of a person", "Description of a person",
                                  all_classes=classes) == 1.0
    # two classes named, the truth among them -> 1/2
    assert m.classification_score("Individual or City", "Individual", all_classes=classes) == 0.5
    # 'Description' counts against a truth it is not a substring of: three named -> 1/3
    assert m.classification_score("Individual or Description of a person", "Individual",
                                  all_classes=classes) == pytest.approx(1 / 3)
    # the truth not named -> 0 (the official fallback is unreachable)
    assert m.classification_score("Location", "Individual", all_classes=classes) == 0.0
    assert m.classification_score("", "Individual", all_classes=classes) == 0.0
    # iteration while removing skips the element after a removed one, as the official loop does:
    # matches = [D, Dx] where both are substrings of the truth "DxY": D is removed, Dx is never visited
    assert m.classification_score("DxY", "DxY", all_classes=["D", "Dx", "DxY"]) == 0.5


def test_retrieval_count_code():
    assert m.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert m.retrieval_score("Paragraph 3 and 4", "Paragraph 3") == 0.5
    assert m.retrieval_score("none", "Paragraph 3") == 0.0
    assert m.retrieval_score("", "Paragraph 3") == 0.0
    assert m.retrieval_zh_score("段落12", "段落12") == 1.0
    assert m.retrieval_zh_score("答案是段落1", "段落12") == 0.0
    assert m.count_score("There are 7 unique paragraphs", "7") == 1.0
    assert m.count_score("7 or 8", "7") == 0.5
    assert m.count_score("", "7") == 0.0
    # the first line that is not a comment or a fence is compared
    assert m.code_sim_score("```python\n# comment\nreturn x\n```", "return x") == 1.0
    assert m.code_sim_score("\n\nreturn x", "return x") == 1.0
    assert m.code_sim_score("", "return x") == 0.0
    assert m.code_sim_score("abcd", "abce") == 0.75


def test_string_match_ruler():
    assert m.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert m.string_match_all("The numbers are 123.", ["123", "456"]) == 0.5
    assert m.string_match_all("ABC", ["abc"]) == 1.0  # case-insensitive
    assert m.string_match_all("", ["x"]) == 0.0
    assert m.string_match_all("x", []) == 0.0
    assert m.string_match_part("Paris or Rome", ["rome", "milan"]) == 1.0
    assert m.string_match_part("Berlin", ["rome", "milan"]) == 0.0
    assert m.string_match_part("x", []) == 0.0


def test_longbench_score_max_over_references_times_100():
    assert m.longbench_score("hotpotqa", "Paris", ["London", "Paris"]) == 100.0
    assert m.longbench_score("triviaqa", "Paris\nLondon is wrong", ["Paris"]) == 100.0  # first line only
    # qasper is not cut to its first line: "paris and more" vs "paris" -> P=1/3, R=1 -> F1=1/2
    assert m.longbench_score("qasper", "Paris\nand more", ["Paris"]) == pytest.approx(50.0)
    assert m.longbench_score("trec", "Individual", ["Individual"], all_classes=["Individual"]) == 100.0
    assert m.longbench_score("passage_count", "3", ["3"]) == 100.0
    assert m.longbench_score("multi_news", "", ["a summary"]) == 0.0
    assert m.longbench_score("narrativeqa", "x", []) == 0.0
    assert set(m.LONGBENCH_METRICS) == {
        "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
        "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
        "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p"}
