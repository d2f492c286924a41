package raw

import (
	"fmt"

	"github.com/vhdkit/vhdkit/disk"
)

// Extents reports the file's data (depth 0) and holes (depth 1) in
// [off, off+length). Where the file cannot tell, all of it is data.
func (img *Image) Extents(off, length int64) ([]disk.Extent, error) {
	if err := img.check("extents", off, length, false); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	list, ok, err := seekExtents(img.f, off, off+length)
	if err != nil {
		return nil, fmt.Errorf("raw: extents at %d: %w", off, err)
	}
	if !ok {
		list = []disk.Extent{{Offset: off, Length: length, Type: disk.Data}}
	}
	return list, nil
}
