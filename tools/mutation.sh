#!/usr/bin/env bash
# Mutation testing of one library module with mutmut 3 (issue 19, section 6).
#
#   bash tools/mutation.sh MODULE            # run (or resume) MODULE's mutants
#   bash tools/mutation.sh MODULE --fresh    # start again from a new copy of HEAD
#   bash tools/mutation.sh MODULE --survivors  # check the survivors again (new tests)
#   bash tools/mutation.sh MODULE --summary  # only print the tally and the survivors
#   bash tools/mutation.sh MODULE --show NAME  # the diff of one mutant
#
# MODULE: norms, balls, subsets, flags, estimators, objective, apgd, square, fab,
# fab_projections (scores in docs/testing.md).
# The run happens in a copy of the committed tree (git archive HEAD: the library,
# the tests and the docs, whose code blocks some tests run) under
# $MUTATION_DIR (default ~/.cache/keras_gradreg_mutation/MODULE), so it never
# writes into the checkout and a second call resumes where the first stopped
# (mutmut keeps every verdict in mutants/*.meta there). Only MODULE's file is
# mutated, and each mutant runs only the listed test files' tests that call
# the mutated function (mutmut's own selection), with -x: seconds per mutant.
#
# TensorFlow is not fork-safe once it has run an op: mutmut's default
# "fork" isolation deadlocks (children sleep until the timeout). The
# "forkserver" isolation keeps a server that has imported the tests but run
# nothing, and forks each mutant's process from it.
set -euo pipefail -o noglob

usage() { sed -n '2,9p' "$0"; exit 2; }
[[ $# -ge 1 ]] || usage
module=$1
shift
names=""

# MODULE -> file to mutate | test selection (pytest args) | mutant name globs (empty: all)
case $module in
  norms) file=keras_gradreg/norms.py
    tests="tests/test_norms.py" ;;
  balls) file=keras_gradreg/balls.py
    tests="tests/test_mutation_kills_balls.py tests/test_attacks.py tests/test_members.py
      -k 'balls or projection or random_points or hashed_starts'" ;;
  subsets) file=keras_gradreg/_subsets.py
    tests="tests/test_mutation_kills_subsets.py tests/test_lazy.py -k 'subsets or subset_term'" ;;
  flags) file=keras_gradreg/robustness/flags.py
    tests="tests/test_mutation_kills_flags.py tests/test_robustness.py
      -k 'mutation_kills_flags or flag_logic_on_constructed'" ;;
  estimators) file=keras_gradreg/_estimators.py
    tests="tests/test_mutation_kills_estimators.py tests/test_golden.py
      tests/test_nonlinear_golden.py tests/test_members.py tests/test_estimators.py
      tests/test_lazy.py tests/test_fixed_settings.py
      -k 'not resumed_run and not mixed_float16'" ;;
  objective) file=keras_gradreg/objective.py  # The scheduling: when the term is computed.
    tests="tests/test_mutation_kills_objective.py tests/test_objective.py
      tests/test_fixed_settings.py tests/test_lazy.py tests/test_schedule.py
      tests/test_mutation_kills_estimators.py" ;;
  apgd) file=keras_gradreg/attacks/auto_pgd.py
    tests="tests/test_mutation_kills_apgd.py tests/test_auto_pgd.py
      tests/test_attack_steps_reference.py" ;;
  square) file=keras_gradreg/attacks/square_attack.py
    tests="tests/test_square_attack.py tests/test_attack_steps_reference.py" ;;
  fab) file=keras_gradreg/attacks/fab_attack.py
    tests="tests/test_mutation_kills_fab.py tests/test_fab.py" ;;
  fab_projections) file=keras_gradreg/attacks/fab_projections.py
    tests="tests/test_mutation_kills_fab.py tests/test_fab.py" ;;
  *) echo "unknown module: $module" >&2; usage ;;
esac
if [[ $module == estimators ]]; then
  # The entries that compute the penalty, adversarial, finite-difference and TRADES
  # terms (mutmut names a method xǁClassǁmethod), and their pieces.
  for c in Penalty FiniteDifference Adversarial Trades; do
    names+=" keras_gradreg._estimators.xǁ${c}ǁ*__mutmut_*"
  done
  for f in _adversarial_weights times _closed_form_perturbation \
    nan_gradient_unless_finite clean_pass_and_input_gradient; do
    names+=" keras_gradreg._estimators.x_${f}__mutmut_*"
  done
fi
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=${MUTATION_DIR:-$HOME/.cache/keras_gradreg_mutation}/$module
action=run
case ${1:-} in
  --fresh) rm -rf "$work"; shift ;;
  --summary) action=summary; shift ;;
  --survivors) action=survivors; shift ;;
  --show) action=show; shift ;;
esac

configure=yes
tree="keras_gradreg tests docs README.md pyproject.toml"
if [[ ! -d $work ]]; then
  mkdir -p "$work"
  # shellcheck disable=SC2086
  git -C "$repo" archive HEAD $tree setup.cfg | tar -xf - -C "$work"
elif [[ $action == run || $action == survivors ]]; then
  # Resume with the committed tests, source and test list (mutmut keeps the verdicts of
  # unchanged code, and collects which new tests call which function).
  # shellcheck disable=SC2086
  git -C "$repo" archive HEAD $tree | tar -xf - -C "$work"
else
  configure=no  # --summary and --show leave the copy alone: a run may be using it.
fi
if [[ $configure == yes ]]; then
  selection=$(python - "$tests" <<'PY'
import shlex, sys
print(", ".join(f'"{a}"' for a in shlex.split(sys.argv[1])))
PY
)
  cat >>"$work/pyproject.toml" <<CFG

[tool.mutmut]
source_paths = ["keras_gradreg"]
only_mutate = ["$file"]
also_copy = ["docs", "README.md"]
pytest_add_cli_args = ["-x", "-p", "no:randomly", "-p", "no:cacheprovider", "-q", "-o", "addopts=-m 'not slow'"]
pytest_add_cli_args_test_selection = [$selection]
process_isolation = "forkserver"
forkserver_warmup = "collect"
CFG
fi

cd "$work"
case $action in
  run)
    globs=$names
    if [[ -n $names && -f mutants/$file.meta ]]; then
      # mutmut reruns every mutant it is given by name: give it only the unchecked ones.
      # shellcheck disable=SC2086
      names=$(python "$repo/tools/mutation_summary.py" "$file" --pending --globs $names)
      [[ -n $names ]] || { python "$repo/tools/mutation_summary.py" "$file"; exit 0; }
    fi
    # One worker: the machine is shared. mutmut exits non-zero when mutants survive.
    # shellcheck disable=SC2086
    mutmut run --max-children "${MUTATION_JOBS:-1}" $names "$@" || true
    # shellcheck disable=SC2086
    python "$repo/tools/mutation_summary.py" "$file" ${globs:+--globs $globs} ;;
  survivors)
    # shellcheck disable=SC2086
    open=$(python "$repo/tools/mutation_summary.py" "$file" --open ${names:+--globs $names})
    # shellcheck disable=SC2086
    [[ -z $open ]] || mutmut run --max-children "${MUTATION_JOBS:-1}" $open || true
    # shellcheck disable=SC2086
    python "$repo/tools/mutation_summary.py" "$file" ${names:+--globs $names} ;;
  summary)
    # shellcheck disable=SC2086
    python "$repo/tools/mutation_summary.py" "$file" ${names:+--globs $names} ;;
  show) mutmut show "$@" ;;
esac
