package main

import "testing"

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"0", 0},
		{"512", 512},
		{"512B", 512},
		{"4K", 4 << 10},
		{"4k", 4 << 10},
		{"4KiB", 4 << 10},
		{"4kib", 4 << 10},
		{"10M", 10 << 20},
		{"10MiB", 10 << 20},
		{"3G", 3 << 30},
		{"3GiB", 3 << 30},
		{"64T", 64 << 40},
		{"64TiB", 64 << 40},
		{"1G ", 1 << 30},
		{"8388607T", 8388607 << 40},
		{"9223372036854775807", 1<<63 - 1},
	} {
		got, err := parseSize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{
		"", "K", "-1", "+1", "1.5G", "1e6", "0x10", "10X", "10 GiBs", "1P",
		"8388608T",            // 2^63: overflows int64
		"9223372036854775808", // likewise
		"99999999999999999999G",
	} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for _, tc := range []struct {
		in   int64
		want string
	}{
		{0, "0 bytes"}, {1, "1 byte"}, {1000, "1000 bytes"}, {1536 << 10, "1536 KiB"},
		{32 << 20, "32 MiB"}, {1 << 30, "1 GiB"}, {64 << 40, "64 TiB"},
	} {
		if got := formatSize(tc.in); got != tc.want {
			t.Errorf("formatSize(%d) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
