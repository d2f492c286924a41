package vhdx

import (
	"os"
	"path/filepath"
	"testing"
)

// TestCheckSamples: every real image checks clean, except the ones with a
// pending log, which check clean after --repair.
func TestCheckSamples(t *testing.T) {
	for _, c := range []struct {
		file    string
		pending bool
	}{
		{"hyperv/fixed.vhdx.gz", false},
		{"hyperv/dynamic.vhdx.gz", false},
		{"hyperv/iotest-dynamic-1G.vhdx.bz2", false},
		{"hyperv/discutils-lvm2.vhdx.gz", false},
		{"disk2vhd/test-disk2vhd.vhdx.bz2", false},
		{"hyperv/discutils-vhdx-log-replay.vhdx.gz", true},
		{"qemu-made/iotest-dirtylog-10G-4M.vhdx.bz2", true},
	} {
		t.Run(filepath.Base(c.file), func(t *testing.T) {
			path := sample(t, c.file, t.TempDir(), "")
			probs, err := Check(path, false)
			if err != nil {
				t.Fatal(err)
			}
			if c.pending != (len(probs) > 0) {
				t.Fatalf("problems %v, pending log %v", probs, c.pending)
			}
			before, _ := os.ReadFile(path)
			if probs, err = Check(path, true); err != nil || len(probs) > 0 {
				t.Fatalf("after repair: %v %v", probs, err)
			}
			after, _ := os.ReadFile(path)
			if !c.pending && string(before) != string(after) {
				t.Error("check --repair changed a clean file")
			}
		})
	}
}
