package main

import (
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/cobra"
)

// cacheCmd is `hangar cache`: the snapshots of a pool's build cache.
func cacheCmd(g *globals) *cobra.Command {
	c := &cobra.Command{
		Use:   "cache",
		Short: "A pool's build cache: list, snapshot and drop its snapshots",
	}
	list := &cobra.Command{
		Use:   "list POOL",
		Short: "List the snapshots of a pool's cache, newest first; new instances start from the current one",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			snaps, err := g.client().CacheSnapshots(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(snaps)
			}
			var rows [][]string
			for _, s := range snaps {
				current := ""
				if s.Current {
					current = "current"
				}
				rows = append(rows, []string{s.ID, s.State, s.CreatedAt.Local().Format(time.DateTime), strconv.Itoa(s.SizeGB), orDash(s.Instance), current})
			}
			return g.table("SNAPSHOT\tSTATE\tCREATED\tSIZE_GB\tFROM\t", rows)
		},
	}
	snapshot := &cobra.Command{
		Use:   "snapshot POOL",
		Short: "Snapshot a pool's cache now, from its most recently used idle instance, without stopping it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := g.client().SnapshotCache(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(s)
			}
			_, err = fmt.Fprintf(g.stdout, "snapshot %s of pool %s's cache taken from %s\n", s.ID, args[0], s.Instance)
			return err
		},
	}
	drop := &cobra.Command{
		Use:   "drop POOL",
		Short: "Delete every snapshot of a pool's cache: the next new instance starts blank",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ids, err := g.client().DropCache(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(map[string][]string{"deleted": ids})
			}
			_, err = fmt.Fprintf(g.stdout, "%d snapshots of pool %s's cache deleted\n", len(ids), args[0])
			return err
		},
	}
	c.AddCommand(list, snapshot, drop)
	return c
}
