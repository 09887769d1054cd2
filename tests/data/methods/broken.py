"""A method file with a syntax error on line 4 (tests/bad_suites/method_file_broken.yaml)."""


def prepare(self model):
    pass
