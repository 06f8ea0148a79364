"""The dashboard's words in English and French (the first sites are French hospitals).

A plain catalogue - key -> (English, French) - rather than gettext: the dashboard has a few hundred
strings, no plural rules beyond "(s)", and a test checks that every key the templates use exists in
both languages. Enumerations (discrepancy kinds, statuses, audit actions ...) are looked up by value
with `Translator.v(prefix, value)`, which falls back to the value itself for one added later.
Data - discrepancy messages, reasons, OIDs, values - are shown as stored, never translated.
"""

from __future__ import annotations

import datetime as dt
import re

LANGUAGES: tuple[str, ...] = ("en", "fr")
DEFAULT = "en"

C: dict[str, tuple[str, str]] = {
    # --- frame
    "skip_to_content": ("Skip to content", "Aller au contenu"),
    "nav.main": ("Main", "Navigation principale"),
    "nav.language": ("Language", "Langue"),
    "nav.overview": ("Overview", "Vue d’ensemble"),
    "nav.subjects": ("Subjects", "Sujets"),
    "nav.queue": ("Reconciliation queue", "File de réconciliation"),
    "nav.audit": ("Audit trail", "Piste d’audit"),
    "nav.sdv": ("SDV report", "Rapport de SDV"),
    "nav.mapping": ("Mapping coverage", "Couverture du mapping"),
    "lang.switch_en": ("English", "English"),
    "lang.switch_fr": ("Français", "Français"),
    "signed_in_as": ("Signed in as", "Connecté en tant que"),
    "sites_label": ("sites", "sites"),
    "logout": ("Log out", "Se déconnecter"),
    "breadcrumb": ("Breadcrumb", "Fil d’Ariane"),
    "footer.privacy": ("Subjects are shown by SubjectKey only: no patient name or hospital identifier appears here. "
                       "Times are UTC.",
                       "Les sujets n’apparaissent que par leur SubjectKey : aucun nom de patient ni identifiant "
                       "hospitalier n’est affiché. Heures en UTC."),
    "footer.demo": ("Demo mode", "Mode démonstration"),
    "yes": ("yes", "oui"),
    "no": ("no", "non"),
    "version_short": ("v.", "v."),
    # --- login
    "login.title": ("Log in", "Connexion"),
    "login.intro": ("esource dashboard for CRAs, data managers and administrators.",
                    "Tableau de bord esource pour les ARC, les data managers et les administrateurs."),
    "login.username": ("Username", "Identifiant"),
    "login.password": ("Password", "Mot de passe"),
    "login.submit": ("Log in", "Se connecter"),
    "login.failed": ("Unknown username or wrong password.", "Identifiant inconnu ou mot de passe incorrect."),
    "login.expired": ("The login form expired: please try again.", "Le formulaire de connexion a expiré : réessayez."),
    "login.no_access": ("This account has no access to the dashboard (CRA, data manager or administrator only).",
                        "Ce compte n’a pas accès au tableau de bord (ARC, data manager ou administrateur seulement)."),
    "login.demo_hint": ("Demo accounts (user / password):", "Comptes de démonstration (identifiant / mot de passe) :"),
    # --- errors
    "error.title": ("Something went wrong", "Une erreur s’est produite"),
    "error.title_403": ("Not allowed", "Accès refusé"),
    "error.title_404": ("Not found", "Introuvable"),
    "error.title_409": ("Not possible now", "Impossible pour l’instant"),
    "error.title_422": ("Not valid", "Demande non valide"),
    "error.explain": ("The request could not be completed.", "La demande n’a pas pu aboutir."),
    "error.explain_403": ("Your role or your site assignment does not allow this page or action.",
                          "Votre rôle ou vos sites affectés ne permettent pas cette page ou cette action."),
    "error.explain_404": ("There is no such page, study or subject.", "Cette page, cette étude ou ce sujet n’existe pas."),
    "error.detail": ("Detail:", "Détail :"),
    "error.home": ("Back to the dashboard", "Retour au tableau de bord"),
    "studies.title": ("Studies", "Études"),
    "studies.none": ("No study is open to you.", "Aucune étude ne vous est ouverte."),
    # --- common columns
    "col.site": ("Site", "Site"),
    "col.subject": ("Subject", "Sujet"),
    "col.subjects": ("Subjects", "Sujets"),
    "col.transfers_today": ("Transfers today", "Transferts aujourd’hui"),
    "col.transfers_week": ("Transfers this week", "Transferts cette semaine"),
    "col.items_sent": ("Items sent", "Items envoyés"),
    "col.items_pending": ("Pending", "En attente"),
    "col.items_held": ("Held", "Retenus"),
    "col.items_rejected": ("Rejected", "Rejetés"),
    "col.open_discrepancies": ("Open discrepancies", "Anomalies ouvertes"),
    "col.kind": ("Kind", "Type"),
    "col.total": ("Total", "Total"),
    "col.form": ("Form", "Formulaire"),
    "col.expected": ("Expected", "Attendus"),
    "col.filled": ("Filled", "Remplis"),
    "col.cell_discrepancy": ("Not filled: open discrepancy", "Non remplis : anomalie ouverte"),
    "col.coverage": ("Coverage", "Couverture"),
    "col.day": ("Day", "Jour"),
    "col.day1": ("Day 1", "Jour 1"),
    "col.consent": ("Consent", "Consentement"),
    "col.withdrawn": ("Withdrawn", "Sortie d’étude"),
    "col.items": ("Items", "Items"),
    "col.transfers": ("Transfers", "Transferts"),
    "col.last_transfer": ("Last transfer", "Dernier transfert"),
    "col.visit": ("Visit", "Visite"),
    "col.repeat": ("Repeat", "Répétition"),
    "col.resource_type": ("FHIR resource", "Ressource FHIR"),
    "col.resource_id": ("Resource id", "Id de la ressource"),
    "col.version": ("Version", "Version"),
    "col.transaction": ("Transaction", "Transaction"),
    "col.sequence": ("Sequence", "Séquence"),
    "col.tx_type": ("Type", "Type"),
    "col.status": ("Status", "Statut"),
    "col.attempts": ("Attempts", "Tentatives"),
    "col.created": ("Queued", "Mise en file"),
    "col.sent": ("Sent", "Envoi"),
    "col.when": ("When", "Date"),
    "col.action": ("Action", "Action"),
    "col.actor": ("Actor", "Acteur"),
    "col.change": ("Old → new", "Ancien → nouveau"),
    "col.reason": ("Reason", "Motif"),
    "col.item": ("Item", "Item"),
    "col.age": ("Age", "Ancienneté"),
    "col.where": ("Visit / form / item", "Visite / formulaire / item"),
    "col.message": ("Message", "Message"),
    "col.assignee": ("Assignee", "Attribuée à"),
    "col.severity": ("Severity", "Gravité"),
    # --- filters and paging
    "filters.label": ("Filters", "Filtres"),
    "filters.apply": ("Apply", "Appliquer"),
    "filters.reset": ("Reset", "Réinitialiser"),
    "filters.all_sites": ("All my sites", "Tous mes sites"),
    "filters.all_kinds": ("All kinds", "Tous les types"),
    "filters.all_actions": ("All actions (data reads aside)", "Toutes les actions (hors lectures)"),
    "filters.min_age": ("At least (days old)", "Au moins (jours)"),
    "filters.max_age": ("At most (days old)", "Au plus (jours)"),
    "filters.since": ("From (date)", "Du (date)"),
    "filters.until": ("To (date, included)", "Au (date incluse)"),
    "pager.label": ("Pages", "Pages"),
    "pager.prev": ("Previous", "Précédent"),
    "pager.next": ("Next", "Suivant"),
    "pager.range": ("{first}–{last} of {total}", "{first}–{last} sur {total}"),
    # --- overview
    "overview.title": ("Study overview", "Vue d’ensemble de l’étude"),
    "overview.as_of": ("As of {when} · metadata {mdv}", "Au {when} · métadonnées {mdv}"),
    "overview.sites": ("Sites", "Sites"),
    "overview.no_sites": ("No site to show.", "Aucun site à afficher."),
    "overview.sites_note": ("Transfers are ODM transactions queued for the EDC (days and weeks in UTC). Items count "
                            "the values in those transactions: sent (received by the EDC), pending (still in the "
                            "outbox), rejected (refused by the EDC); held values wait in the reconciliation queue.",
                            "Les transferts sont les transactions ODM mises en file pour l’EDC (jours et semaines "
                            "en UTC). Les items comptent les valeurs de ces transactions : envoyés (reçus par "
                            "l’EDC), en attente (encore dans la file), rejetés (refusés par l’EDC) ; les valeurs "
                            "retenues attendent dans la file de réconciliation."),
    "overview.by_kind": ("Open discrepancies by kind", "Anomalies ouvertes par type"),
    "overview.no_discrepancies": ("No open discrepancy.", "Aucune anomalie ouverte."),
    "edc.title": ("EDC connection", "Connexion à l’EDC"),
    "edc.connector": ("Connector", "Connecteur"),
    "edc.state": ("State", "État"),
    "edc.last_success": ("Last success", "Dernier succès"),
    "edc.last_failure": ("Last failure", "Dernier échec"),
    "edc.queue": ("Outbox", "File d’envoi"),
    "edc.until": ("until {when}", "jusqu’au {when}"),
    "edc.no_failure": ("none pending", "aucun en cours"),
    "edc.none": ("No EDC connector is configured for this study.", "Aucun connecteur EDC n’est configuré pour cette étude."),
    "coverage.title": ("Coverage: eCRF items filled automatically", "Couverture : items du CRFe remplis automatiquement"),
    "coverage.explain": ("Expected items come from the study map and its ODM metadata: for DM each item the map "
                         "fills; for VS and LB one result per test of the map at each scheduled visit whose window "
                         "has opened (up to withdrawal); unscheduled visits are extra. Logs (MH, CM) have no expected "
                         "count: their records are counted.",
                         "Les items attendus viennent du mapping de l’étude et de ses métadonnées ODM : pour DM "
                         "chaque item que le mapping remplit ; pour VS et LB un résultat par test du mapping à chaque "
                         "visite planifiée dont la fenêtre est ouverte (jusqu’à la sortie d’étude) ; les visites non "
                         "planifiées s’ajoutent. Les journaux (MH, CM) n’ont pas de nombre attendu : leurs "
                         "enregistrements sont comptés."),
    "coverage.log": ("log: {n} record(s)", "journal : {n} enregistrement(s)"),
    "chart.title": ("Transfers and discrepancies, last {days} days", "Transferts et anomalies, {days} derniers jours"),
    "chart.desc": ("Bars per UTC day: ODM transactions queued, and discrepancies opened. The same numbers are in the "
                   "table below.",
                   "Barres par jour (UTC) : transactions ODM mises en file et anomalies ouvertes. Les mêmes chiffres "
                   "figurent dans le tableau ci-dessous."),
    "chart.as_table": ("Show as a table", "Afficher sous forme de tableau"),
    "chart.transfers": ("Transfers", "Transferts"),
    "chart.discrepancies": ("Discrepancies opened", "Anomalies ouvertes"),
    # --- subjects
    "subjects.title": ("Subjects", "Sujets"),
    "subjects.caption": ("{n} subject(s)", "{n} sujet(s)"),
    "subjects.none": ("No subject.", "Aucun sujet."),
    "subject.title": ("Subject {key}", "Sujet {key}"),
    "subject.grid": ("Visits × forms", "Visites × formulaires"),
    "subject.grid_help": ("Each cell shows its most urgent state and how many values or discrepancies are in each "
                          "state. Open a cell to see its values; open a value to trace it to its FHIR source.",
                          "Chaque cellule montre son état le plus urgent et le nombre de valeurs ou d’anomalies par "
                          "état. Ouvrez une cellule pour voir ses valeurs, puis une valeur pour remonter à sa source "
                          "FHIR."),
    "subject.cell_title": ("{form} at {event}", "{form} à {event}"),
    "subject.cell_caption": ("Item group {group}: one row per repeat", "Groupe d’items {group} : une ligne par répétition"),
    "subject.cell_empty": ("No value esource sent for this cell.", "Aucune valeur envoyée par esource pour cette cellule."),
    "subject.cell_discrepancies": ("Open discrepancies of this cell", "Anomalies ouvertes de cette cellule"),
    "subject.lineage_of": ("lineage of {item}", "traçabilité de {item}"),
    # --- lineage
    "lineage.title": ("Lineage", "Traçabilité"),
    "lineage.heading": ("Lineage: {item}", "Traçabilité : {item}"),
    "lineage.current": ("The value now", "La valeur actuelle"),
    "lineage.value": ("Value", "Valeur"),
    "lineage.never_sent": ("never sent", "jamais envoyée"),
    "lineage.frozen": ("frozen", "gelée"),
    "lineage.frozen_q": ("Frozen", "Gelée"),
    "lineage.rule": ("Map rule", "Règle de mapping"),
    "lineage.source": ("FHIR source", "Source FHIR"),
    "lineage.source_id": ("SourceID sent to the EDC", "SourceID transmis à l’EDC"),
    "lineage.first_seen": ("First seen", "Vue pour la première fois"),
    "lineage.latest_version": ("Newest version kept", "Dernière version conservée"),
    "lineage.conversions": ("Conversions", "Conversions"),
    "lineage.no_conversion": ("No conversion: the value was taken as it was.", "Aucune conversion : valeur reprise telle quelle."),
    "lineage.sources": ("Source versions", "Versions de la source"),
    "lineage.no_sources": ("No source version recorded.", "Aucune version de source enregistrée."),
    "lineage.transfers": ("Transactions and EDC answers", "Transactions et réponses de l’EDC"),
    "lineage.no_transfers": ("No transaction carried this value.", "Aucune transaction n’a porté cette valeur."),
    "lineage.edc_answer": ("EDC answer", "Réponse de l’EDC"),
    "lineage.ack": ("acknowledged ({ref})", "accusé de réception ({ref})"),
    "lineage.rejected": ("rejected, code {code}:", "rejetée, code {code} :"),
    "lineage.open_discrepancies": ("Open discrepancies", "Anomalies ouvertes"),
    "lineage.history": ("History", "Historique"),
    "lineage.manual": ("manual", "manuel"),
    # --- queue
    "queue.title": ("Reconciliation queue", "File de réconciliation"),
    "queue.read_only": ("Read only: CRAs see the queue of their sites; data managers act on it.",
                        "Lecture seule : les ARC voient la file de leurs sites ; les data managers la traitent."),
    "queue.caption": ("{n} discrepancy(ies)", "{n} anomalie(s)"),
    "queue.empty": ("No discrepancy matches.", "Aucune anomalie ne correspond."),
    "queue.held_value": ("Proposed value", "Valeur proposée"),
    "queue.select": ("Select discrepancy #{id}", "Sélectionner l’anomalie n° {id}"),
    "queue.select_all": ("Select all on this page", "Tout sélectionner sur cette page"),
    "queue.bulk": ("Act on the selected discrepancies", "Traiter les anomalies sélectionnées"),
    "queue.bulk_submit": ("Apply to the selection", "Appliquer à la sélection"),
    "bulk.title": ("Bulk action", "Action groupée"),
    "bulk.summary": ("{action}: {matched} selected, {ok} done, {failed} not done.",
                     "{action} : {matched} sélectionnée(s), {ok} traitée(s), {failed} non traitée(s)."),
    "bulk.outcome": ("Outcome", "Résultat"),
    "bulk.ok": ("done", "traitée"),
    "bulk.failed": ("not done", "non traitée"),
    "bulk.none": ("Nothing matched the selection (closed meanwhile?).",
                  "Rien ne correspond à la sélection (fermée entre-temps ?)."),
    "bulk.back": ("Back to the queue", "Retour à la file"),
    "bulk.need_ids": ("Select at least one discrepancy.", "Sélectionnez au moins une anomalie."),
    "bulk.need_reason": ("A reason is required.", "Un motif est obligatoire."),
    "bulk.need_value": ("Override needs the corrected value.", "La correction demande la valeur corrigée."),
    # --- one discrepancy
    "disc.title": ("Discrepancy #{id}", "Anomalie n° {id}"),
    "disc.heading": ("Discrepancy #{id}: {kind}", "Anomalie n° {id} : {kind}"),
    "disc.opened": ("opened {when}", "ouverte le {when}"),
    "disc.resolved_by": ("Closed by", "Fermée par"),
    "disc.compare": ("Source and proposed value", "Source et valeur proposée"),
    "disc.source": ("What the EHR says", "Ce que dit le DPI"),
    "disc.no_source": ("No source resource.", "Aucune ressource source."),
    "disc.current_version": ("Version kept now", "Version conservée"),
    "disc.changed_since": ("changed since", "modifiée depuis"),
    "disc.proposed": ("What esource would send", "Ce qu’esource enverrait"),
    "disc.sent": ("What esource sent before", "Ce qu’esource a déjà envoyé"),
    "disc.nothing_sent": ("Nothing sent for this item.", "Rien d’envoyé pour cet item."),
    "disc.edc": ("What the EDC holds", "Ce que contient l’EDC"),
    "disc.candidates": ("Other readings and answers", "Autres mesures et réponses"),
    "disc.actions": ("Decide", "Décider"),
    "disc.no_actions": ("No action applies: the discrepancy is closed.", "Aucune action possible : l’anomalie est fermée."),
    "disc.history": ("Audit entries about this discrepancy", "Entrées d’audit sur cette anomalie"),
    "disc.no_history": ("No entry yet.", "Aucune entrée pour l’instant."),
    "act.reason_label": ("Reason (required, audited)", "Motif (obligatoire, tracé)"),
    "act.value_label": ("Corrected value (override only)", "Valeur corrigée (correction seulement)"),
    "act.help_accept": ("Send the proposed value to the EDC.", "Envoyer la valeur proposée à l’EDC."),
    "act.help_override": ("Send a corrected value instead (checked against the study metadata).",
                          "Envoyer une valeur corrigée à la place (contrôlée avec les métadonnées de l’étude)."),
    "act.help_dismiss": ("Close without sending anything.", "Fermer sans rien envoyer."),
    "act.help_repush": ("Send the subject's rejected transactions to the EDC again.",
                        "Renvoyer à l’EDC les transactions rejetées du sujet."),
    "act.done": ("Done: {action}.", "Fait : {action}."),
    "act.queued": ("{n} item(s) queued for the EDC in transaction #{outbox}.",
                   "{n} item(s) mis en file pour l’EDC dans la transaction n° {outbox}."),
    "act.failed": ("Not done: {reason}", "Non fait : {reason}"),
    # --- audit
    "audit.title": ("Audit trail", "Piste d’audit"),
    "audit.explain": ("Every event, newest first: who, what, when, why, old and new value, FHIR source and map "
                      "rule. The trail is hash-chained; reading it is itself recorded.",
                      "Chaque événement, du plus récent au plus ancien : qui, quoi, quand, pourquoi, ancienne et "
                      "nouvelle valeur, source FHIR et règle de mapping. La piste est chaînée par empreintes ; sa "
                      "consultation est elle-même tracée."),
    "audit.include_reads": ("Include data reads", "Inclure les lectures de données"),
    "audit.caption": ("{n} entry(ies)", "{n} entrée(s)"),
    "audit.empty": ("No entry matches.", "Aucune entrée ne correspond."),
    "export.label": ("Export:", "Export :"),
    "export.csv": ("CSV", "CSV"),
    "export.odm": ("ODM (AuditRecords)", "ODM (AuditRecords)"),
    "export.audit_note": ("(sources pseudonymised, as sent to the EDC)", "(sources pseudonymisées, comme envoyées à l’EDC)"),
    # --- SDV
    "sdv.title": ("Source data verification report", "Rapport de vérification des données source"),
    "sdv.explain": ("Reads every subject back from the EDC and compares each item with what esource sent.",
                    "Relit chaque sujet dans l’EDC et compare chaque item à ce qu’esource a envoyé."),
    "sdv.generated": ("Read back {when} from {connector}", "Relu le {when} depuis {connector}"),
    "sdv.by_site": ("By site", "Par site"),
    "sdv.by_subject": ("By subject", "Par sujet"),
    "sdv.edc_error": ("EDC read-back error", "Erreur de relecture EDC"),
    "sdv.show_matching": ("Show matching items too", "Afficher aussi les items concordants"),
    "sdv.items_caption": ("{n} item(s)", "{n} item(s)"),
    "sdv.esource_value": ("esource value", "Valeur esource"),
    "sdv.edc_value": ("EDC value", "Valeur EDC"),
    "sdv.note": ("Note", "Remarque"),
    "sdv.in_transit": ("in transit", "en cours d’envoi"),
    "sdv.all_match": ("Every item matches.", "Tous les items concordent."),
    "sdv.none": ("No subject to compare.", "Aucun sujet à comparer."),
    "sdv.no_connector": ("This study has no EDC connector.", "Cette étude n’a pas de connecteur EDC."),
    "sdv.no_read_back": ("The study's EDC connector cannot read data back: no comparison is possible.",
                         "Le connecteur EDC de l’étude ne sait pas relire les données : aucune comparaison possible."),
    # --- mapping
    "mapping.title": ("Mapping coverage", "Couverture du mapping"),
    "mapping.explain": ("Per map rule (form and test, or form and FHIR resource type): item values it mapped "
                        "(updates count again), eCRF records it fills now, discrepancies it raised, the "
                        "discrepancy rate = discrepancies ÷ (records + discrepancies), and the newest one.",
                        "Par règle de mapping (formulaire et test, ou formulaire et type de ressource FHIR) : "
                        "valeurs d’items produites (les mises à jour comptent à nouveau), enregistrements du CRFe "
                        "remplis, anomalies levées, taux d’anomalies = anomalies ÷ (enregistrements + anomalies), "
                        "et la plus récente."),
    "mapping.rule": ("Rule", "Règle"),
    "mapping.values": ("Values mapped", "Valeurs produites"),
    "mapping.records": ("Records filled", "Enregistrements remplis"),
    "mapping.discrepancies": ("Discrepancies", "Anomalies"),
    "mapping.rate": ("Discrepancy rate", "Taux d’anomalies"),
    "mapping.last_error": ("Last error", "Dernière erreur"),
    "mapping.open": ("{n} open", "{n} ouverte(s)"),
    "mapping.none": ("Nothing mapped yet.", "Rien n’a encore été produit."),
    # --- enumerations: roles
    "role.cra": ("CRA", "ARC"),
    "role.data_manager": ("data manager", "data manager"),
    "role.admin": ("administrator", "administrateur"),
    "role.edc": ("EDC account", "compte EDC"),
    "role.system": ("system", "système"),
    # cell and item states
    "state.filled": ("filled", "rempli"),
    "state.pending": ("pending", "en attente"),
    "state.held": ("held", "retenu"),
    "state.rejected": ("rejected", "rejeté"),
    "state.conflict": ("conflict", "conflit"),
    "state.empty": ("no data", "aucune donnée"),
    "state.na": ("not collected", "non recueilli"),
    # discrepancy statuses, filters and resolutions
    "status.open": ("open", "ouverte"),
    "status.in_review": ("in review", "en revue"),
    "status.resolved": ("resolved", "résolue"),
    "status.dismissed": ("dismissed", "classée"),
    "status_filter.open_all": ("open or in review", "ouvertes ou en revue"),
    "status_filter.open": ("open", "ouvertes"),
    "status_filter.in_review": ("in review", "en revue"),
    "status_filter.resolved": ("resolved", "résolues"),
    "status_filter.dismissed": ("dismissed", "classées"),
    "status_filter.all": ("all", "toutes"),
    "resolution.accepted": ("accepted", "acceptée"),
    "resolution.overridden": ("overridden", "corrigée"),
    "resolution.dismissed": ("dismissed", "classée"),
    "resolution.remapped": ("re-mapped", "re-mappée"),
    "resolution.repushed": ("re-pushed", "renvoyée"),
    "severity.info": ("info", "information"),
    "severity.warning": ("warning", "avertissement"),
    "severity.error": ("error", "erreur"),
    # actions on discrepancies
    "act.accept": ("Accept", "Accepter"),
    "act.override": ("Override", "Corriger"),
    "act.dismiss": ("Dismiss", "Classer"),
    "act.repush": ("Re-push", "Renvoyer"),
    # transfer (outbox) statuses
    "transfer.pending": ("pending", "en attente"),
    "transfer.sent": ("sent", "envoyée"),
    "transfer.acked": ("acknowledged", "acquittée"),
    "transfer.rejected": ("rejected", "rejetée"),
    "transfer.failed": ("failing", "en échec"),
    # circuit breaker
    "circuit.closed": ("connected", "connecté"),
    "circuit.open": ("paused (circuit open)", "en pause (disjoncteur ouvert)"),
    "circuit.auth_failed": ("credentials refused", "identifiants refusés"),
    # SDV categories
    "sdv.matching": ("matching", "concordant"),
    "sdv.changed_in_edc": ("changed in the EDC", "modifié dans l’EDC"),
    "sdv.missing_in_edc": ("missing in the EDC", "absent de l’EDC"),
    "sdv.only_in_edc": ("only in the EDC", "seulement dans l’EDC"),
    # discrepancy kinds
    "kind.unmapped_code": ("unmapped code", "code non mappé"),
    "kind.unknown_unit": ("unknown unit", "unité inconnue"),
    "kind.unit_not_convertible": ("unit not convertible", "unité non convertible"),
    "kind.comparator_value": ("comparator value", "valeur avec comparateur"),
    "kind.out_of_range": ("out of range", "hors limites"),
    "kind.ambiguous_data": ("ambiguous data", "données ambiguës"),
    "kind.missing_date": ("missing date", "date manquante"),
    "kind.missing_value": ("missing value", "valeur manquante"),
    "kind.invalid_source": ("invalid source", "source invalide"),
    "kind.possible_adverse_event": ("possible adverse event", "événement indésirable possible"),
    "kind.unknown_gender": ("unknown gender", "sexe inconnu"),
    "kind.entered_in_error": ("entered in error", "saisie erronée"),
    "kind.privacy_blocked": ("privacy blocked", "bloqué (confidentialité)"),
    "kind.edc_rejected": ("EDC rejected", "rejet par l’EDC"),
    "kind.edc_conflict": ("EDC conflict", "conflit avec l’EDC"),
    "kind.review_required": ("review required", "revue requise"),
    # audit actions
    "action.message.received": ("message received", "message reçu"),
    "action.message.duplicate": ("duplicate message", "message en double"),
    "action.message.dead_lettered": ("message dead-lettered", "message rejeté (lettre morte)"),
    "action.patient.matched": ("patient matched", "patient apparié"),
    "action.patient.dropped": ("patient not enrolled (dropped)", "patient non inclus (ignoré)"),
    "action.value.mapped": ("value mapped", "valeur produite"),
    "action.value.held": ("value held", "valeur retenue"),
    "action.value.frozen": ("value frozen", "valeur gelée"),
    "action.transfer.queued": ("transfer queued", "transfert mis en file"),
    "action.transfer.sent": ("transfer sent", "transfert envoyé"),
    "action.transfer.acknowledged": ("transfer acknowledged", "transfert acquitté"),
    "action.transfer.rejected": ("transfer rejected", "transfert rejeté"),
    "action.transfer.failed": ("transfer failed", "transfert en échec"),
    "action.transfer.repushed": ("transfer re-pushed", "transfert renvoyé"),
    "action.discrepancy.opened": ("discrepancy opened", "anomalie ouverte"),
    "action.discrepancy.changed": ("discrepancy changed", "anomalie modifiée"),
    "action.discrepancy.resolved": ("discrepancy resolved", "anomalie résolue"),
    "action.discrepancy.dismissed": ("discrepancy dismissed", "anomalie classée"),
    "action.enrollment.created": ("subject enrolled", "sujet inclus"),
    "action.enrollment.changed": ("enrollment changed", "inclusion modifiée"),
    "action.config.changed": ("configuration changed", "configuration modifiée"),
    "action.user.changed": ("user changed", "utilisateur modifié"),
    "action.data.read": ("data read", "lecture de données"),
    # ages
    "age.days": ("{n} d", "{n} j"),
    "age.hours": ("{n} h", "{n} h"),
    "age.minutes": ("{n} min", "{n} min"),
}

_FIELD = re.compile(r"{(\w+)}")


def negotiate(accept_language: str | None) -> str:
    """The best of LANGUAGES for an Accept-Language header (q-values honoured; on equal q-values the
    first listed wins), else English."""
    if not accept_language:
        return DEFAULT
    found: list[tuple[float, int, str]] = []
    for i, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            name, _, value = p.strip().partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in LANGUAGES and q > 0:
            found.append((q, -i, primary))
    return max(found)[2] if found else DEFAULT


class Translator:
    """`t("key", name=value)` in the templates; `t.v("kind", value)` for enumerations."""

    def __init__(self, lang: str) -> None:
        self.lang = lang if lang in LANGUAGES else DEFAULT
        self._i = LANGUAGES.index(self.lang)

    def __call__(self, key: str, /, **params: object) -> str:
        entry = C.get(key)
        if entry is None:
            return key  # a missing key shows itself (tests check there are none)
        text = entry[self._i]
        return _FIELD.sub(lambda m: str(params.get(m.group(1), m.group(0))), text) if params else text

    def v(self, prefix: str, value: object) -> str:
        key = f"{prefix}.{value}"
        return self(key) if key in C else str(value)

    def pct(self, share: float | None) -> str:
        if share is None:
            return "–"
        n = round(share * 100)
        return f"{n}\u202f%" if self.lang == "fr" else f"{n}%"

    def age(self, delta: dt.timedelta) -> str:
        seconds = int(delta.total_seconds())
        if seconds >= 86400:
            return self("age.days", n=seconds // 86400)
        if seconds >= 3600:
            return self("age.hours", n=seconds // 3600)
        return self("age.minutes", n=max(seconds // 60, 0))
