package saver

import (
	"errors"
	"strings"
	"testing"
)

// TestCheckUUID: tcp-info's UUIDs pass; anything that is not a plain file
// name fails with ErrBadUUID.
func TestCheckUUID(t *testing.T) {
	for _, u := range []string{
		"mlab1-lga0t.mlab-oti.measurement-lab.org_1700000000_0000000000012345",
		"ndt-k8s_1577000000_unsafe_00000000000000ab",
		"offline_20261125T232153.694760613Z_10.99.0.1_38918_10.99.0.2_8080",
		"a..b", "x", strings.Repeat("a", MaxUUIDLen),
	} {
		if err := CheckUUID(u); err != nil {
			t.Errorf("CheckUUID(%q) = %v, want nil", u, err)
		}
	}
	for _, u := range []string{
		"", ".", "..", "../../etc/cron.d/x", "a/b", "/abs", ".partial", ".hidden",
		"a\x00b", "line\nbreak", "del\x7f", strings.Repeat("a", MaxUUIDLen+1),
	} {
		if err := CheckUUID(u); !errors.Is(err, ErrBadUUID) {
			t.Errorf("CheckUUID(%q) = %v, want ErrBadUUID", u, err)
		}
	}
}
