package imagecopy

import (
	"slices"
	"testing"
)

func TestNonZeroSpans(t *testing.T) {
	data := make([]byte, 10*16)
	data[0] = 1      // granule 0
	data[16+15] = 1  // granule 1 (joins 0)
	data[4*16+3] = 1 // granule 4
	data[9*16] = 1   // the last granule
	got := nonZeroSpans(data, 16)
	want := []span{{0, 32}, {64, 16}, {144, 16}}
	if !slices.Equal(got, want) {
		t.Errorf("nonZeroSpans = %v, want %v", got, want)
	}
	if got := nonZeroSpans(data[:150], 16); !slices.Equal(got, []span{{0, 32}, {64, 16}, {144, 6}}) {
		t.Errorf("nonZeroSpans of a short tail = %v", got)
	}
	if got := nonZeroSpans(make([]byte, 100), 16); got != nil {
		t.Errorf("nonZeroSpans of zeros = %v, want none", got)
	}
}

func TestDiffSpans(t *testing.T) {
	a, b := make([]byte, 8*512), make([]byte, 8*512)
	a[10] = 1        // sector 0
	a[512+511] = 1   // sector 1 (joins 0)
	a[5*512] = 1     // sector 5
	b[7*512+100] = 1 // sector 7
	got := diffSpans(a, b, 512, 0)
	want := []span{{0, 1024}, {5 * 512, 512}, {7 * 512, 512}}
	if !slices.Equal(got, want) {
		t.Errorf("diffSpans = %v, want %v", got, want)
	}
	// data starting mid-sector: spans end on the disk's sector boundaries.
	a[200] = 1
	got = diffSpans(a[100:], b[100:], 512, 100)
	want = []span{{0, 924}, {5*512 - 100, 512}, {7*512 - 100, 512}}
	if !slices.Equal(got, want) {
		t.Errorf("diffSpans from offset 100 = %v, want %v", got, want)
	}
}
