"""Answer pairs in the styles of MATH-500, AIME and GSM8K: (prediction inside \\boxed{}, reference, equivalent?).

Expectations are what is mathematically right, not what a grader happens to say."""

POSITIVE = [
    # fractions, decimals, \dfrac
    ("0.5", "\\frac{1}{2}"),
    ("1.5", "\\frac{3}{2}"),
    ("\\dfrac{14}{3}", "\\frac{14}{3}"),
    ("14/3", "\\frac{14}{3}"),
    ("\\tfrac{3}{56}", "\\frac{3}{56}"),
    ("0.3888", "\\frac{243}{625}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    # radicals and symbolic forms
    ("11\\sqrt{2}", "11\\sqrt2"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("-q+p", "p - q"),
    ("\\pi", "\\pi"),
    # complex numbers and spacing
    ("6-5i", "6 - 5i"),
    ("-2+7i", "-2 + 7i"),
    ("3 \\sqrt{13}", "3\\sqrt{13}"),
    # tuples and intervals
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("[2,5)", "[2, 5)"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("(1,2,3)", "(1, 2, 3)"),
    # degrees
    ("90", "90^\\circ"),
    ("90^{\\circ}", "90^\\circ"),
    # text, units, currency
    ("\\text{Evelyn}", "\\text{Evelyn}"),
    ("Evelyn", "\\text{Evelyn}"),
    ("10\\text{ cm}", "10"),
    ("\\$18.90", "18.90"),
    # integers: leading zeros, AoPS styling, signs
    ("073", "73"),
    ("\\textbf{(073)}", "73"),
    ("-50", "-50"),
    ("2000", "2000"),
    # matrices and vectors
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}"),
]

NEGATIVE = [
    ("0.51", "\\frac{1}{2}"),
    ("\\frac{14}{5}", "\\frac{14}{3}"),
    ("3.14159", "\\pi"),
    ("2\\sqrt{3}", "\\sqrt{8}"),
    ("p+q", "p - q"),
    ("6+5i", "6 - 5i"),
    ("3\\sqrt{12}", "3\\sqrt{13}"),
    ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("[2,5]", "[2, 5)"),
    ("(2,5)", "[2,5)"),
    ("(1,3,2)", "(1, 2, 3)"),
    ("91", "90^\\circ"),
    ("\\text{Bob}", "\\text{Evelyn}"),
    ("-73", "73"),
    ("730", "73"),
    ("7.3", "73"),
    ("\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\begin{pmatrix} 1 & 1 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}"),
    ("19", "18.90"),
]
