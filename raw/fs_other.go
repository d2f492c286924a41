//go:build !linux

package raw

import (
	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/storage"
)

// Without Linux's fallocate modes and SEEK_DATA values, raw writes zeros
// and reports one data extent.
const (
	fallocKeepSize  = 0
	fallocPunchHole = 0
	fallocZeroRange = 0
)

func fallocate(storage.File, uint32, int64, int64) (bool, error) { return false, nil }

func seekExtents(storage.File, int64, int64) ([]disk.Extent, bool, error) {
	return nil, false, nil
}
