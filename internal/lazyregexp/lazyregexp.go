// Package lazyregexp is a regular expression compiled on first use, for
// package-level expressions: regexp.MustCompile in a var runs at every
// start of every program that links the package, and vhdkit starts for
// each command (an expression with a counted repetition such as {0,63}
// costs some 100 us and 800 allocations to compile).
package lazyregexp

import (
	"regexp"
	"sync"
)

// Regexp is an expression compiled on its first use, which panics if it
// does not compile, as regexp.MustCompile would at start.
type Regexp struct {
	expr string
	re   func() *regexp.Regexp
}

// New returns the expression, not yet compiled.
func New(expr string) *Regexp {
	return &Regexp{expr: expr, re: sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(expr) })}
}

// String is the expression's source text.
func (r *Regexp) String() string { return r.expr }

// MatchString reports whether s contains a match.
func (r *Regexp) MatchString(s string) bool { return r.re().MatchString(s) }

// FindStringSubmatch returns the leftmost match and its submatches, or nil.
func (r *Regexp) FindStringSubmatch(s string) []string { return r.re().FindStringSubmatch(s) }
