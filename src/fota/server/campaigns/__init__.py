"""Staged rollout campaigns: a release, a target filter, waves, pacing (docs/campaigns.md).

    spec.py    what a campaign is (validated JSON)
    states.py  the campaign state table and device-in-campaign states
    pacing.py  maintenance window, rate, back-off (pure functions of time)
    engine.py  CampaignEngine.tick(): one idempotent step per campaign, state in the database
    ops.py     operator actions (create/start/pause/resume/abort) and views
"""
from fota.server.campaigns.engine import CampaignEngine
from fota.server.campaigns.ops import (
    abort_campaign,
    campaign_summary,
    check_campaign_key,
    create_campaign,
    get_campaign,
    list_campaigns,
    pause_campaign,
    preview_campaign,
    resume_campaign,
    start_campaign,
)
from fota.server.campaigns.spec import CampaignError, CampaignNotFound, CampaignSpec, CampaignStateError

__all__ = ["CampaignEngine", "CampaignError", "CampaignNotFound", "CampaignSpec", "CampaignStateError", "abort_campaign", "campaign_summary",
           "check_campaign_key",
           "create_campaign", "get_campaign", "list_campaigns", "pause_campaign", "preview_campaign", "resume_campaign",
           "start_campaign"]
