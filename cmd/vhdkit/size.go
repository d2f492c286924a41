package main

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// sizeUnits are the suffixes parseSize accepts, in powers of 1024.
var sizeUnits = []struct {
	suffixes []string
	shift    uint
}{
	{[]string{"K", "KB", "KIB"}, 10},
	{[]string{"M", "MB", "MIB"}, 20},
	{[]string{"G", "GB", "GIB"}, 30},
	{[]string{"T", "TB", "TIB"}, 40},
	{[]string{"B", ""}, 0},
}

// parseSize parses a byte count: a plain decimal number of bytes, or one
// followed by K, M, G or T (also KiB, MiB, GiB, TiB; any case), which are
// powers of 1024. "1G" is 1073741824. Negative, fractional and overflowing
// values are errors.
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, &sizeError{s, "want a whole number of bytes, optionally with K, M, G or T"}
	}
	digits, unit := t[:i], strings.ToUpper(strings.TrimSpace(t[i:]))
	shift, ok := uint(0), false
	for _, u := range sizeUnits {
		for _, suffix := range u.suffixes {
			if unit == suffix {
				shift, ok = u.shift, true
			}
		}
	}
	if !ok {
		return 0, &sizeError{s, "want a whole number of bytes, optionally with K, M, G or T"}
	}
	n, err := strconv.ParseInt(digits, 10, 64)
	if err != nil || n > math.MaxInt64>>shift {
		return 0, &sizeError{s, "too large"}
	}
	return n << shift, nil
}

// sizeError is a size that parseSize rejects.
type sizeError struct {
	input  string
	reason string
}

func (e *sizeError) Error() string { return fmt.Sprintf("invalid size %q: %s", e.input, e.reason) }

// formatSize renders n bytes in the largest binary unit that divides it
// exactly ("32 MiB", "1536 KiB", "1000 bytes").
func formatSize(n int64) string {
	units := []string{"TiB", "GiB", "MiB", "KiB"}
	shifts := []uint{40, 30, 20, 10}
	for i, sh := range shifts {
		if n != 0 && n%(1<<sh) == 0 {
			return fmt.Sprintf("%d %s", n>>sh, units[i])
		}
	}
	if n == 1 {
		return "1 byte"
	}
	return fmt.Sprintf("%d bytes", n)
}

// sizeValue is a flag.Value holding a size parsed by parseSize.
type sizeValue struct {
	n   int64
	set bool
}

func (v *sizeValue) String() string {
	if v == nil || !v.set {
		return ""
	}
	return strconv.FormatInt(v.n, 10)
}

func (v *sizeValue) Set(s string) error {
	n, err := parseSize(s)
	if se, ok := err.(*sizeError); ok {
		return errors.New(se.reason) // the flag package already quotes the value
	}
	if err != nil {
		return err
	}
	v.n, v.set = n, true
	return nil
}
