SELECT status, count(*) AS "count!" FROM payouts
     WHERE status IN ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'failed', 'cancelled', 'held')
     GROUP BY status