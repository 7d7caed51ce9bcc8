"""Writes tests/data/leetcode.jsonl and tests/data/livecodebench.jsonl: problems of our own, in the formats of the real
files (DeepSeek-Coder's LeetCode set as EM_PT ships it; LiveCodeBench code_generation_lite rows)."""
import base64, json, os, pickle, random, zlib

OUT = os.path.dirname(os.path.abspath(__file__)) + "/"
random.seed(7)


class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next


def count_vowel_runs(s):
    runs, prev = 0, False
    for ch in s:
        v = ch in "aeiou"
        runs += v and not prev
        prev = v
    return runs


def pairs_below(nums, k):
    return sum(nums[i] + nums[j] < k for i in range(len(nums)) for j in range(i + 1, len(nums)))


def add_next(values):
    return [v + values[i + 1] if i + 1 < len(values) else v for i, v in enumerate(values)]


def smallest_digit_product(n):
    if n == 1:
        return 1
    digits = []
    for d in range(9, 1, -1):
        while n % d == 0:
            digits.append(d)
            n //= d
    return int("".join(map(str, sorted(digits)))) if n == 1 else -1


def statement(text, examples, constraints):
    body = text + "\n"
    for i, (inp, out) in enumerate(examples, 1):
        body += f"\nExample {i}:\n\nInput: {inp}\nOutput: {out}\n"
    return body + "\n\nConstraints:\n\n" + "".join(f" * {c}\n" for c in constraints)


def row(n, slug, title, difficulty, text, examples, constraints, stub, method, cases, linked=False):
    st = statement(text, examples, constraints)
    test = "\nmy_solution = Solution()\n"
    if linked:
        test += ("\n_f1 = lambda lst: ListNode(lst[0], _f1(lst[1:])) if lst else None\n"
                 "_f2 = lambda node: [node.val] + _f2(node.next) if node else []\n\n")
    for args, want in cases:
        shown = ", ".join(f'"{k}": {("_f1(" + json.dumps(v) + ")") if linked and k == "head" else json.dumps(v)}'
                          for k, v in args.items())
        call = f"my_solution.{method}(**test_input)"
        test += f"\ntest_input = {{ {shown} }}\nassert {'_f2(' + call + ')' if linked else call} == {json.dumps(want)}\n"
    return {"task_id": f"em-own-contest-{n}-{slug}", "url": f"https://example.invalid/problems/{slug}",
            "title": slug, "meta": {"questionId": str(9000 + n), "questionFrontendId": str(9000 + n), "title": title,
                                    "titleSlug": slug, "isPaidOnly": False, "difficulty": difficulty, "likes": 0,
                                    "dislikes": 0, "categoryTitle": "Algorithms"},
            "prompt": '"""\n' + st + '"""\n' + stub,
            "prompt_sft": st + "\n\nPlease complete the code below to solve above prblem:\n```python\n" + stub + "\n```",
            "test": test, "start_time": 1700000000 + n}


rows = []
words = ["".join(random.choice("abeiouxyz") for _ in range(random.randint(1, 12))) for _ in range(25)]
rows.append(row(1, "count-vowel-runs", "Count Vowel Runs", "Easy",
                "Given a lowercase string s, return how many maximal blocks of consecutive vowels (a, e, i, o, u) it "
                "contains.", [('s = "beautiful"', 3), ('s = "xyz"', 0)], ["1 <= s.length <= 100"],
                "class Solution:\n    def countVowelRuns(self, s: str) -> int:\n        ", "countVowelRuns",
                [({"s": w}, count_vowel_runs(w)) for w in ["beautiful", "xyz"] + words]))
lists = [[random.randint(-20, 20) for _ in range(random.randint(1, 9))] for _ in range(25)]
cases = [({"nums": [1, 2, 3], "k": 5}, 2), ({"nums": [4], "k": 1}, 0)] + \
    [({"nums": v, "k": k}, pairs_below(v, k)) for v, k in ((v, random.randint(-10, 20)) for v in lists)]
rows.append(row(2, "pairs-with-sum-below", "Pairs With Sum Below", "Medium",
                "Given an integer array nums and an integer k, return the number of index pairs (i, j) with i < j and "
                "nums[i] + nums[j] < k.", [("nums = [1,2,3], k = 5", 2), ("nums = [4], k = 1", 0)],
                ["1 <= nums.length <= 50", "-50 <= nums[i], k <= 50"],
                "class Solution:\n    def pairsBelow(self, nums: List[int], k: int) -> int:\n        ", "pairsBelow", cases))
lls = [[random.randint(0, 9) for _ in range(random.randint(1, 8))] for _ in range(25)]
rows.append(row(3, "add-next-node-value", "Add Next Node Value", "Medium",
                "You are given the head of a singly linked list. Add to every node the value of the node after it "
                "(the last node keeps its value) and return the head of the list.",
                [("head = [1,2,3]", [3, 5, 3]), ("head = [7]", [7])], ["The number of nodes is in the range [1, 100]"],
                "# Definition for singly-linked list.\nclass ListNode:\n    def __init__(self, val=0, next=None):\n"
                "        self.val = val\n        self.next = next\nclass Solution:\n"
                "    def addNext(self, head: Optional[ListNode]) -> Optional[ListNode]:\n        ", "addNext",
                [({"head": v}, add_next(v)) for v in [[1, 2, 3], [7]] + lls], linked=True))
ns = [1, 10, 12, 7, 11, 36, 100, 26, 360, 49] + [random.randint(1, 2000) for _ in range(20)]
rows.append(row(4, "smallest-digit-product", "Smallest Digit Product", "Hard",
                "Given a positive integer n, return the smallest positive integer whose decimal digits multiply to n, "
                "or -1 if there is none.", [("n = 12", 26), ("n = 11", -1)], ["1 <= n <= 10^4"],
                "class Solution:\n    def smallestDigitProduct(self, n: int) -> int:\n        ",
                "smallestDigitProduct", [({"n": n}, smallest_digit_product(n)) for n in ns]))
with open(OUT + "leetcode.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")


def pack(tests):  # LiveCodeBench's private_test_cases: base64(zlib(pickle(JSON text)))
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def lcb(qid, title, content, platform, starter, difficulty, public, private, func=None):
    return {"question_title": title, "question_content": content, "platform": platform, "question_id": qid,
            "contest_id": qid.split("_")[0], "contest_date": "2023-09-02T00:00:00", "starter_code": starter,
            "difficulty": difficulty, "public_test_cases": json.dumps(public), "private_test_cases": pack(private),
            "metadata": json.dumps({"func_name": func} if func else {})}


def sq(nums):
    return str(sum(x * x for x in nums)) + "\n"


def stdin_case(nums):
    return {"input": f"{len(nums)}\n{' '.join(map(str, nums))}\n", "output": sq(nums), "testtype": "stdin"}


def mean_case(nums):
    return {"input": f"{len(nums)}\n{' '.join(map(str, nums))}\n", "output": f"{sum(nums) / len(nums):.10f}\n",
            "testtype": "stdin"}


def gap(nums):
    s = sorted(nums)
    return max((b - a for a, b in zip(s, s[1:])), default=0)


def fn_case(nums):
    return {"input": json.dumps(nums), "output": json.dumps(gap(nums)), "testtype": "functional"}


def rot(nums, k):
    k %= len(nums)
    return nums[-k:] + nums[:-k] if k else nums


def fn2_case(nums, k):
    return {"input": json.dumps(nums) + "\n" + json.dumps(k), "output": json.dumps(rot(nums, k)),
            "testtype": "functional"}


rnd = [[random.randint(-100, 100) for _ in range(random.randint(1, 8))] for _ in range(6)]
lrows = [
    lcb("emx001_a", "Sum of Squares", "You are given N integers A_1, ..., A_N. Print the sum of their squares.\n\n"
        "Input\n\nN\nA_1 A_2 ... A_N\n\nOutput\n\nPrint the answer.\n\nConstraints\n\n- 1 <= N <= 100\n"
        "- -100 <= A_i <= 100", "atcoder", "", "easy", [stdin_case([1, 2, 3]), stdin_case([-4])],
        [stdin_case(v) for v in rnd[:4]]),
    lcb("emx001_b", "Mean Value", "You are given N integers. Print their mean. Your answer is accepted if its "
        "absolute or relative error is at most 10^{-6}.\n\nInput\n\nN\nA_1 A_2 ... A_N\n\nOutput\n\nPrint the mean.",
        "atcoder", "", "medium", [mean_case([1, 2, 3, 4]), mean_case([5])], [mean_case(v) for v in rnd[2:]]),
    lcb("9001", "maximum-sorted-gap", "Given an integer array nums, return the largest difference between two "
        "consecutive elements of nums after sorting it, or 0 if nums has one element.\n\nExample 1:\n\nInput: nums = "
        "[3,6,9,1]\nOutput: 3", "leetcode", "class Solution:\n    def maxGap(self, nums: List[int]) -> int:\n        ",
        "medium", [fn_case([3, 6, 9, 1]), fn_case([10])], [fn_case(v) for v in rnd], "maxGap"),
    lcb("9002", "rotate-right", "Given an integer array nums and an integer k, return nums rotated to the right by "
        "k steps.\n\nExample 1:\n\nInput: nums = [1,2,3], k = 1\nOutput: [3,1,2]", "leetcode",
        "class Solution:\n    def rotateRight(self, nums: List[int], k: int) -> List[int]:\n        ", "easy",
        [fn2_case([1, 2, 3], 1)], [fn2_case(v, i) for i, v in enumerate(rnd)], "rotateRight"),
]
with open(OUT + "livecodebench.jsonl", "w") as f:
    for r in lrows:
        f.write(json.dumps(r) + "\n")
print(f"wrote {len(rows)} LeetCode-format rows and {len(lrows)} LiveCodeBench-format rows to {OUT}")
