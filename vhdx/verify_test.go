package vhdx

import (
	"bytes"
	"testing"
)

// wantCleanContent checks the closed image at path: the strict check finds
// nothing, and opened read-only it reads model.
func wantCleanContent(t *testing.T, path string, model []byte, what string) {
	t.Helper()
	probs, err := Check(path, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range probs {
		t.Errorf("%s: check: %v", what, p)
	}
	ro, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if got := readAll(t, ro); !bytes.Equal(got, model) {
		t.Fatalf("%s: content differs at %d", what, firstDiff(got, model))
	}
}
