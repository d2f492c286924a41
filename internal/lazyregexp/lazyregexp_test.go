package lazyregexp

import (
	"slices"
	"testing"
)

func TestRegexp(t *testing.T) {
	r := New(`^(?i:cp)-([0-9]+)$`)
	if r.String() != `^(?i:cp)-([0-9]+)$` {
		t.Fatalf("String() = %q", r.String())
	}
	if !r.MatchString("CP-12") || r.MatchString("cp-x") {
		t.Fatal("MatchString disagrees with the expression")
	}
	if got := r.FindStringSubmatch("cp-007"); !slices.Equal(got, []string{"cp-007", "007"}) {
		t.Fatalf("FindStringSubmatch = %q", got)
	}
	if r.FindStringSubmatch("name") != nil {
		t.Fatal("FindStringSubmatch of no match is not nil")
	}
}

func TestRegexpInvalidPanicsOnUse(t *testing.T) {
	r := New(`(`) // no panic here: nothing is compiled yet
	defer func() {
		if recover() == nil {
			t.Fatal("an invalid expression did not panic on first use")
		}
	}()
	r.MatchString("x")
}
